-- Pairs still to publish whose hard negatives hold a rejected image: the negatives they keep (in
-- drawn order) and how many replacements they need.
CREATE OR REPLACE TEMP TABLE negatives_to_replace AS
WITH annotated AS (
    SELECT p.pair_id, p.q_id, p.t_id, p.hn_ids
    FROM read_parquet($pairs) AS p
    SEMI JOIN read_parquet($annotations) AS a ON a.pair_id = p.pair_id
    ANTI JOIN curation_exclusions AS x ON x.pair_id = p.pair_id
),
slots AS (
    SELECT pair_id, q_id, t_id, hn_ids, unnest(hn_ids) AS hn_id, generate_subscripts(hn_ids, 1) AS pos
    FROM annotated
)
SELECT
    s.pair_id,
    any_value(s.q_id) AS q_id,
    any_value(s.t_id) AS t_id,
    any_value(s.hn_ids) AS hn_ids,
    list(s.hn_id ORDER BY s.pos) FILTER (WHERE r.image_id IS NULL) AS kept,
    count(r.image_id) AS needed
FROM slots AS s
LEFT JOIN rejected_images AS r ON r.image_id = s.hn_id
GROUP BY s.pair_id
HAVING count(r.image_id) > 0;
