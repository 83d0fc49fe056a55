-- Every retrieved neighbour of every encoder: the query's retrieved set for hard negatives.
CREATE OR REPLACE TEMP VIEW neighbours AS
SELECT f.encoder, n.q_id, n.t_id AS n_id, n.sim
FROM read_parquet(getvariable('pairs_inputs').neighbours, filename = true) AS n
JOIN encoder_files AS f ON n.filename = f.path;
