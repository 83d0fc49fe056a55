-- One row per ordered (q, t): a pair found by several encoders is one pair that remembers them all.
-- The (encoder, sim) structs are sorted after aggregation, which is cheaper than an ordered
-- aggregate; pair ids are hashed later, only for the pairs that survive the cap.
CREATE OR REPLACE TEMP TABLE union_pairs AS
WITH found AS (
    SELECT q_id, t_id, list_sort(list({'encoder': encoder, 'sim': sim})) AS views, max(sim) AS max_sim
    FROM candidates
    GROUP BY q_id, t_id
)
SELECT
    q_id,
    t_id,
    list_transform(views, lambda v: v.encoder) AS encoders,
    list_transform(views, lambda v: v.sim) AS sims,
    max_sim
FROM found;
