-- Publishable pairs: those with a full set of $n hard negatives.
SELECT
    p.pair_id,
    p.q_id,
    p.t_id,
    p.encoders,
    p.sims,
    p.max_sim,
    list_slice(h.ranked_negatives, 1, $n) AS hn_ids
FROM capped_pairs AS p
LEFT JOIN pair_negatives AS h USING (pair_id)
WHERE len(coalesce(h.ranked_negatives, [])) >= $n
ORDER BY p.pair_id;
