-- Instruction length in words.
SELECT len(words) AS n_words, count(*) AS instructions
FROM instruction_rows
GROUP BY n_words
ORDER BY n_words;
