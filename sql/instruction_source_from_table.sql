-- The instruction lists of a registered Arrow table (instruction_source_table: row_id, pair_id, q_text).
CREATE OR REPLACE TEMP VIEW instruction_source AS SELECT * FROM instruction_source_table
