-- Remember a version's annotations; a pair already catalogued keeps its first publication.
INSERT INTO published_pairs
SELECT
    pair_id,
    describe_backend || ':' || describe_model,
    instruct_backend || ':' || instruct_model,
    prompt_version,
    $version,
    description,
    q_text,
    word_num,
    describe_backend,
    describe_model,
    instruct_backend,
    instruct_model
FROM read_parquet($triplets)
ON CONFLICT DO NOTHING;
