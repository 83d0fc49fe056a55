-- The most common openings (first three words) over all instructions.
SELECT array_to_string(words[1:3], ' ') AS opening, count(*) AS instructions
FROM instruction_rows
GROUP BY opening
ORDER BY instructions DESC, opening
LIMIT $top;
