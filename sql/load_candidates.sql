-- In-band candidates of every encoder, tagged with the encoder that found them. A view: the files
-- are scanned by the queries that need them instead of being copied into memory.
CREATE OR REPLACE TEMP VIEW candidates AS
SELECT f.encoder, c.q_id, c.t_id, c.sim, c.rank
FROM read_parquet(getvariable('pairs_inputs').candidates, filename = true) AS c
JOIN encoder_files AS f ON c.filename = f.path;
