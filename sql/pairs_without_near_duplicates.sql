-- Drop pairs whose two images are perceptually the same picture (re-encodes, resizes, crops of one
-- photo): their embeddings may still land inside the band, but they teach a retriever nothing.
CREATE OR REPLACE TEMP VIEW distinct_pairs AS
SELECT u.*
FROM union_pairs AS u
JOIN images AS qi ON qi.image_id = u.q_id
JOIN images AS ti ON ti.image_id = u.t_id
WHERE bit_count(xor(qi.phash, ti.phash)) > getvariable('pairs_inputs').max_hamming;
