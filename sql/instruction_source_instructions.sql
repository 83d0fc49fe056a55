-- The instruction lists of annotations.parquet (before anything is published).
CREATE OR REPLACE TEMP TABLE instruction_source AS
SELECT row_number() OVER () AS row_id, pair_id, instructions AS q_text FROM read_parquet($paths)
