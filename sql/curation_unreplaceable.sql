-- Pairs whose rejected hard negatives could not all be replaced are withheld too.
INSERT INTO curation_exclusions
SELECT
    p.pair_id,
    p.q_id,
    p.t_id,
    'rejected_negative_without_replacement',
    p.needed || ' rejected hard negative(s) and too few eligible replacements in the query''s retrieved set'
FROM negatives_to_replace AS p
ANTI JOIN replaced_negatives AS r ON r.pair_id = p.pair_id;
