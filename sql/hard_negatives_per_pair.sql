-- Hard negatives of each capped pair: its query's drawn images in order, minus the target and any
-- perceptual duplicate of the target (that would be a false negative). One pass over the pairs,
-- each joined to its query's single pool row.
CREATE OR REPLACE TEMP TABLE pair_negatives AS
SELECT
    substr(sha256(p.q_id || ':' || p.t_id), 1, 16) AS pair_id,
    p.q_id,
    p.t_id,
    p.encoders,
    p.sims,
    p.max_sim,
    list_transform(
        list_filter(
            coalesce(h.drawn, []),
            lambda x: x.id <> p.t_id AND bit_count(xor(x.phash, ti.phash)) > $max_hamming
        ),
        lambda x: x.id
    ) AS negatives
FROM capped_pairs AS p
JOIN images AS ti ON ti.image_id = p.t_id
LEFT JOIN query_pools AS h ON h.q_id = p.q_id;
