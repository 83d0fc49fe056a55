-- Annotations already published for this run's pairs by the same annotators and prompt version:
-- reused as they are instead of asking the models again.
SELECT
    c.pair_id,
    c.description,
    c.instructions,
    c.word_num,
    c.describe_backend,
    c.describe_model,
    c.instruct_backend,
    c.instruct_model,
    c.prompt_version,
    0::INTEGER AS attempts
FROM published_pairs AS c
JOIN read_parquet($pairs) AS p USING (pair_id)
WHERE c.describe_key = $describe_key
  AND c.instruct_key = $instruct_key
  AND c.prompt_version = $prompt_version
ORDER BY c.pair_id;
