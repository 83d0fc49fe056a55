-- Per source row: the largest share of triplets holding one of its instructions, and the largest
-- share of all instructions opening like one of its instructions.
WITH instruction_share AS (
    SELECT norm, count(DISTINCT pair_id) / (SELECT count(*) FROM instruction_source) AS share
    FROM instruction_rows
    GROUP BY norm
),
opening_share AS (
    SELECT array_to_string(words[1:3], ' ') AS opening,
           count(*) / (SELECT count(*) FROM instruction_rows) AS share
    FROM instruction_rows
    GROUP BY opening
)
SELECT r.row_id, max(i.share) AS instruction_share, max(o.share) AS opening_share
FROM instruction_rows AS r
JOIN instruction_share AS i USING (norm)
JOIN opening_share AS o ON o.opening = array_to_string(r.words[1:3], ' ')
GROUP BY r.row_id;
