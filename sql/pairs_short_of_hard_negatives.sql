-- Pairs whose query's retrieved set cannot supply $n hard negatives: reported, not published.
SELECT
    pair_id,
    q_id,
    t_id,
    'pairs' AS stage,
    'insufficient_hard_negatives' AS reason,
    format('the query''s retrieved set offers {} eligible negatives, {} needed', len(negatives), $n) AS detail,
    0::INTEGER AS attempts
FROM pair_negatives
WHERE len(negatives) < $n
ORDER BY pair_id;
