-- One row per instruction of the view `instruction_source` (row_id, pair_id, q_text). `norm` is the
-- instruction with case, runs of spaces and end punctuation ignored, so that trivial variants of
-- one template count as the same instruction; `words` are its letter/digit tokens.
CREATE OR REPLACE TEMP TABLE instruction_rows AS
SELECT
    row_id,
    pair_id,
    text,
    trim(rtrim(trim(regexp_replace(lower(text), '\s+', ' ', 'g')), '.!?;:,')) AS norm,
    regexp_extract_all(lower(text), '[\pL\pN'']+') AS words
FROM (SELECT row_id, pair_id, unnest(q_text) AS text FROM instruction_source);
