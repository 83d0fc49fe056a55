-- At most $cap targets per query: prefer targets found by more views, then the most similar.
CREATE OR REPLACE TEMP TABLE capped_pairs AS
SELECT *
FROM distinct_pairs
QUALIFY row_number() OVER (
    PARTITION BY q_id ORDER BY len(encoders) DESC, max_sim DESC, t_id
) <= $cap;
