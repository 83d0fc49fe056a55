-- Hard-negative image ids resolved to paths, keeping the drawn order; a curator's replacement
-- negatives (curation_*.sql) take the place of the drawn ones.
CREATE OR REPLACE TEMP TABLE hard_negative_paths AS
WITH negatives AS (
    SELECT p.pair_id, coalesce(r.hn_ids, p.hn_ids) AS hn_ids
    FROM read_parquet($pairs) AS p
    LEFT JOIN replaced_negatives AS r USING (pair_id)
),
positions AS (
    SELECT pair_id, hn_ids, generate_subscripts(hn_ids, 1) AS pos
    FROM negatives
)
SELECT p.pair_id, list(i.path ORDER BY p.pos) AS hn_paths
FROM positions AS p
JOIN read_parquet($images) AS i ON i.image_id = p.hn_ids[p.pos]
GROUP BY p.pair_id;
