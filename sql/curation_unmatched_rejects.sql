-- Listed ids this run does not contain (lists accumulate across runs, so this is no error).
SELECT
    (SELECT count(*) FROM rejected_pairs ANTI JOIN read_parquet($pairs) AS p USING (pair_id)) AS pairs,
    (SELECT count(*) FROM rejected_images ANTI JOIN read_parquet($images) AS i USING (image_id)) AS images;
