-- Image id, caption and size of every path the gallery shows (hard negatives are stored as paths).
SELECT path, image_id, caption, width, height
FROM read_parquet($images)
WHERE path IN (SELECT unnest($paths::VARCHAR[]));
