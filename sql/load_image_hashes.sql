-- Per image: its perceptual hash (near-duplicate tests) and a seeded 64-bit draw key, md5 of
-- seed:image_id, computed once per image rather than once per retrieved row.
CREATE OR REPLACE TEMP TABLE images AS
SELECT image_id, phash, md5_number_lower($seed || ':' || image_id) AS draw_key
FROM read_parquet(getvariable('pairs_inputs').images);
