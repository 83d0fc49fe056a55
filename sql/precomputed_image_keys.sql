-- The key each row of images.parquet is found by, per precomputed.match_on: its image_id or
-- sha256, or its path (and the paths of the exact copies collapsed into it), or its img2dataset
-- key (a tar member or file name without its extension).
CREATE TEMP TABLE image_keys AS
WITH images AS (
    SELECT file_row_number AS row, image_id, sha256, path, duplicate_paths
    FROM read_parquet($images, file_row_number = true)
),
paths AS (
    SELECT row, path AS k FROM images
    UNION ALL
    SELECT row, unnest(duplicate_paths) AS k FROM images
),
keyed AS (
    SELECT row, image_id AS k FROM images WHERE $match_on = 'image_id'
    UNION ALL
    SELECT row, sha256 AS k FROM images WHERE $match_on = 'sha256'
    UNION ALL
    SELECT row, k FROM paths WHERE $match_on = 'path'
    UNION ALL
    SELECT row,
           regexp_replace(CASE WHEN k LIKE '%.tar#%' THEN regexp_extract(k, '\.tar#(.*)$', 1)
                               ELSE regexp_extract(k, '[^/]+$') END, '\.[^./]*$', '') AS k
    FROM paths WHERE $match_on = 'key'
)
SELECT DISTINCT row, k FROM keyed WHERE k IS NOT NULL
