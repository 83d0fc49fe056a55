CREATE OR REPLACE TEMP TABLE images AS
SELECT image_id, phash FROM read_parquet($path);
