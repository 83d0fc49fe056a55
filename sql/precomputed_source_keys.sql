-- Every row of the precomputed key files: (file, row in file, key). A relative path key is taken
-- from $path_root when one is given (clip-retrieval writes paths as given on its command line).
-- `file_index` maps each key file to its position among the vector files.
CREATE TEMP TABLE src AS
SELECT f.file,
       s.file_row_number AS frow,
       CASE WHEN $path_root IS NOT NULL AND NOT starts_with(s.key, '/')
            THEN $path_root || regexp_replace(s.key, '^(\./)+', '')
            ELSE s.key END AS k
FROM read_parquet($key_files, filename = true, file_row_number = true) AS s
JOIN file_index AS f USING (filename)
