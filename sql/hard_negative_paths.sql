-- Hard-negative image ids resolved to paths, keeping the drawn order.
CREATE OR REPLACE TEMP TABLE hard_negative_paths AS
WITH positions AS (
    SELECT pair_id, hn_ids, generate_subscripts(hn_ids, 1) AS pos
    FROM read_parquet($pairs)
)
SELECT p.pair_id, list(i.path ORDER BY p.pos) AS hn_paths
FROM positions AS p
JOIN read_parquet($images) AS i ON i.image_id = p.hn_ids[p.pos]
GROUP BY p.pair_id;
