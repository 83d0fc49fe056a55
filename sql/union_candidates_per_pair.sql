-- One row per ordered (q, t): a pair found by several encoders is one pair that remembers them all.
CREATE OR REPLACE TEMP TABLE union_pairs AS
SELECT
    substr(sha256(q_id || ':' || t_id), 1, 16) AS pair_id,
    q_id,
    t_id,
    list(encoder ORDER BY encoder) AS encoders,
    list(sim ORDER BY encoder) AS sims,
    max(sim) AS max_sim
FROM candidates
GROUP BY q_id, t_id;
