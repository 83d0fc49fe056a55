-- The catalogue of everything published under one output root: one row per published pair and
-- annotator identity, and one row per dataset version (a run partition).
CREATE TABLE IF NOT EXISTS published_pairs (
    pair_id VARCHAR NOT NULL,
    describe_key VARCHAR NOT NULL,      -- backend:model of the describe step
    instruct_key VARCHAR NOT NULL,      -- backend:model of the instruct step
    prompt_version VARCHAR NOT NULL,
    version VARCHAR NOT NULL,           -- the dataset version that first published this annotation
    description VARCHAR,
    instructions VARCHAR[],
    word_num INTEGER,
    describe_backend VARCHAR,
    describe_model VARCHAR,
    instruct_backend VARCHAR,
    instruct_model VARCHAR,
    PRIMARY KEY (pair_id, describe_key, instruct_key, prompt_version)
);
CREATE TABLE IF NOT EXISTS versions (
    version VARCHAR PRIMARY KEY,
    parent VARCHAR,
    run_dir VARCHAR NOT NULL,
    run_id VARCHAR,
    published_at TIMESTAMP NOT NULL,
    triplets BIGINT NOT NULL,
    added BIGINT NOT NULL,
    manifest JSON NOT NULL
);
