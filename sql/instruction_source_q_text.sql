-- The instruction lists of published triplet parts.
CREATE OR REPLACE TEMP TABLE instruction_source AS
SELECT row_number() OVER () AS row_id, pair_id, q_text FROM read_parquet($paths)
