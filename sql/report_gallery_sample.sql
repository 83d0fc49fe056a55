-- A seeded sample of triplets found by encoder $encoder, skipping pairs already in the gallery.
SELECT pair_id, q_id, t_id, q_img, t_img, hns, q_text, encoders, sims, description, word_num
FROM read_parquet($paths)
WHERE list_contains(encoders, $encoder)
  AND pair_id NOT IN (SELECT unnest($taken::VARCHAR[]))
ORDER BY md5($seed || ':gallery:' || $encoder || ':' || pair_id)
LIMIT $k;
