-- In-band candidates of every encoder, tagged with the encoder that found them.
CREATE OR REPLACE TEMP TABLE candidates AS
SELECT f.encoder, c.q_id, c.t_id, c.sim, c.rank
FROM read_parquet($paths, filename = true) AS c
JOIN encoder_files AS f ON c.filename = f.path;
