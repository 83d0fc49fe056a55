-- Where the embedding cache holds each wanted key: (key, segment file, row). Two segments may
-- hold one key (two runs computed it at once): any copy serves; the first by name keeps the
-- choice stable. `wanted` is a registered table of keys.
SELECT c.key, arg_min(c.filename, c.filename), arg_min(c.file_row_number, c.filename)
FROM read_parquet($segments, filename = true, file_row_number = true) AS c
SEMI JOIN wanted AS w ON c.key = w.key
GROUP BY c.key
