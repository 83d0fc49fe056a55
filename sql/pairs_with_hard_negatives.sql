-- Publishable pairs: those with a full set of $n hard negatives.
SELECT pair_id, q_id, t_id, encoders, sims, max_sim, list_slice(negatives, 1, $n) AS hn_ids
FROM pair_negatives
WHERE len(negatives) >= $n
ORDER BY pair_id;
