-- Distinct-n: distinct word n-grams over all n-grams, for n = 1 and 2, on a seeded sample of
-- $sample instructions: the ratio falls as a corpus grows, so a fixed-size sample keeps runs of
-- any size comparable. Template collapse drives it towards zero even when no two instructions
-- are identical.
WITH sample AS (
    SELECT words
    FROM instruction_rows
    ORDER BY md5(pair_id || ':' || text), row_id, text
    LIMIT $sample
),
unigrams AS (
    SELECT unnest(words) AS g FROM sample
),
bigrams AS (
    SELECT unnest(list_transform(range(1, len(words)), lambda i: words[i] || ' ' || words[i + 1])) AS g
    FROM sample
)
SELECT
    (SELECT count(*) FROM sample) AS sampled,
    (SELECT count(*) FROM unigrams) AS unigrams,
    (SELECT count(DISTINCT g) FROM unigrams) AS distinct_unigrams,
    (SELECT count(*) FROM bigrams) AS bigrams,
    (SELECT count(DISTINCT g) FROM bigrams) AS distinct_bigrams,
    (SELECT count(DISTINCT w) FROM (SELECT unnest(words) AS w FROM instruction_rows)) AS vocabulary;
