-- Pairs whose query's retrieved set cannot supply $n hard negatives: reported, not published.
SELECT
    p.pair_id,
    p.q_id,
    p.t_id,
    len(coalesce(h.ranked_negatives, [])) AS available
FROM capped_pairs AS p
LEFT JOIN pair_negatives AS h USING (pair_id)
WHERE len(coalesce(h.ranked_negatives, [])) < $n
ORDER BY p.pair_id;
