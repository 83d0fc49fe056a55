-- Annotated pairs a curator withheld: listed by pair id, or whose query or target is a listed
-- image (and, with $drop_negatives, whose hard negatives hold one). One row per pair, under the
-- first reason that applies; `detail` carries the curator's own words and where they wrote them.
CREATE OR REPLACE TEMP TABLE curation_exclusions AS
WITH annotated AS (
    SELECT p.pair_id, p.q_id, p.t_id, p.hn_ids
    FROM read_parquet($pairs) AS p
    SEMI JOIN read_parquet($annotations) AS a ON a.pair_id = p.pair_id
),
hits AS (
    SELECT a.pair_id, a.q_id, a.t_id, 1 AS priority, 'rejected_pair' AS reason, r.reason AS why, r.line
    FROM annotated AS a JOIN rejected_pairs AS r ON r.pair_id = a.pair_id
    UNION ALL
    SELECT a.pair_id, a.q_id, a.t_id, 2, 'rejected_query_image', r.reason, r.line
    FROM annotated AS a JOIN rejected_images AS r ON r.image_id = a.q_id
    UNION ALL
    SELECT a.pair_id, a.q_id, a.t_id, 3, 'rejected_target_image', r.reason, r.line
    FROM annotated AS a JOIN rejected_images AS r ON r.image_id = a.t_id
    UNION ALL
    SELECT a.pair_id, a.q_id, a.t_id, 4, 'rejected_negative_image', r.reason, r.line
    FROM (SELECT pair_id, q_id, t_id, unnest(hn_ids) AS hn_id FROM annotated) AS a
    JOIN rejected_images AS r ON r.image_id = a.hn_id
    WHERE $drop_negatives
)
SELECT
    pair_id,
    any_value(q_id) AS q_id,
    any_value(t_id) AS t_id,
    arg_min(reason, (priority, line)) AS reason,
    arg_min(
        coalesce(nullif(why, ''), 'no reason given') || ' (' || $source || ' line ' || line || ')',
        (priority, line)
    ) AS detail
FROM hits
GROUP BY pair_id;
