-- Replacements for rejected hard negatives, from the same pool the pairs stage draws from: the
-- query's retrieved set (any encoder, below that encoder's upper band edge), never the query, the
-- target, a negative the pair already has, a rejected image, or a perceptual twin of the target;
-- seeded, so the same run picks the same replacements. Pairs short of replacements get none.
CREATE OR REPLACE TEMP TABLE replaced_negatives AS
WITH images AS (
    SELECT image_id, phash FROM read_parquet($images)
),
retrieved AS (
    SELECT DISTINCT n.q_id, n.t_id AS n_id
    FROM read_parquet($neighbours, filename = true) AS n
    JOIN encoder_files AS f ON f.path = n.filename
    WHERE n.sim < f.hi AND n.q_id IN (SELECT q_id FROM negatives_to_replace)
),
eligible AS (
    SELECT p.pair_id, r.n_id, md5($seed || ':curation:' || p.pair_id || ':' || r.n_id) AS draw
    FROM negatives_to_replace AS p
    JOIN retrieved AS r ON r.q_id = p.q_id
    JOIN images AS ni ON ni.image_id = r.n_id
    JOIN images AS ti ON ti.image_id = p.t_id
    WHERE r.n_id <> p.q_id
      AND r.n_id <> p.t_id
      AND NOT list_contains(p.hn_ids, r.n_id)
      AND r.n_id NOT IN (SELECT image_id FROM rejected_images)
      AND bit_count(xor(ni.phash, ti.phash)) > $max_hamming
),
ranked AS (
    SELECT pair_id, list(n_id ORDER BY draw) AS pool FROM eligible GROUP BY pair_id
)
SELECT
    p.pair_id,
    list_concat(coalesce(p.kept, []), list_slice(r.pool, 1, p.needed)) AS hn_ids,
    p.needed AS replaced
FROM negatives_to_replace AS p
JOIN ranked AS r USING (pair_id)
WHERE len(r.pool) >= p.needed;
