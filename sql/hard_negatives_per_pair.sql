-- Hard negatives: images from the query's retrieved set (any encoder), below that encoder's upper
-- band edge (not a near-duplicate of the query), never the query or the target, and never a
-- perceptual duplicate of the target (that would be a false negative). The draw is a seeded hash,
-- so the same run seed always picks the same negatives.
CREATE OR REPLACE TEMP TABLE pair_negatives AS
WITH retrieved AS (
    SELECT DISTINCT n.q_id, n.n_id
    FROM neighbours AS n
    JOIN bands AS b ON b.encoder = n.encoder
    WHERE n.sim < b.hi
),
eligible AS (
    SELECT p.pair_id, r.n_id, md5($seed || ':' || p.pair_id || ':' || r.n_id) AS draw
    FROM capped_pairs AS p
    JOIN retrieved AS r ON r.q_id = p.q_id
    JOIN images AS ni ON ni.image_id = r.n_id
    JOIN images AS ti ON ti.image_id = p.t_id
    WHERE r.n_id <> p.t_id
      AND r.n_id <> p.q_id
      AND bit_count(xor(ni.phash, ti.phash)) > $max_hamming
)
SELECT pair_id, list(n_id ORDER BY draw) AS ranked_negatives
FROM eligible
GROUP BY pair_id;
