-- Triplets of a version whose (pair, annotators, prompt version) no earlier version published.
SELECT count(*) FROM read_parquet($triplets) AS t
WHERE NOT EXISTS (
    SELECT 1 FROM published_pairs AS c
    WHERE c.pair_id = t.pair_id
      AND c.describe_key = t.describe_backend || ':' || t.describe_model
      AND c.instruct_key = t.instruct_backend || ':' || t.instruct_model
      AND c.prompt_version = t.prompt_version
      AND c.version <> $version
);
