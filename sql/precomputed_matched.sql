-- Each image's vector: the first row (by file, then row) holding its key; an image reachable by
-- several keys (duplicate paths) takes its first vector. `claims`: images sharing that vector.
CREATE TEMP TABLE matched AS
WITH first_src AS (
    SELECT k, arg_min(file, (file, frow)) AS file, arg_min(frow, (file, frow)) AS frow
    FROM src WHERE k IS NOT NULL GROUP BY k
),
per_row AS (
    SELECT i.row, arg_min(s.file, (s.file, s.frow)) AS file, arg_min(s.frow, (s.file, s.frow)) AS frow
    FROM image_keys AS i JOIN first_src AS s USING (k) GROUP BY i.row
)
SELECT row, file, frow, count(*) OVER (PARTITION BY file, frow) AS claims FROM per_row
