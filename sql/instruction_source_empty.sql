-- No source files: an empty source of the right shape.
CREATE OR REPLACE TEMP VIEW instruction_source AS
SELECT 0::BIGINT AS row_id, ''::VARCHAR AS pair_id, []::VARCHAR[] AS q_text LIMIT 0
