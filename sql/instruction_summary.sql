-- Corpus-level instruction figures: rows (triplets), instructions, words, vocabulary.
SELECT
    (SELECT count(*) FROM instruction_source) AS pairs,
    count(*) AS instructions,
    coalesce(avg(len(words)), 0) AS mean_words,
    coalesce(median(len(words)), 0) AS median_words,
    coalesce(quantile_disc(len(words), 0.05), 0) AS p5_words,
    coalesce(quantile_disc(len(words), 0.95), 0) AS p95_words,
    coalesce(max(len(words)), 0) AS max_words,
    count(DISTINCT norm) AS distinct_instructions
FROM instruction_rows;
