-- No rejects file (or an empty one): nothing is excluded, no negative replaced.
CREATE OR REPLACE TEMP TABLE curation_exclusions (
    pair_id VARCHAR, q_id VARCHAR, t_id VARCHAR, reason VARCHAR, detail VARCHAR
);
CREATE OR REPLACE TEMP TABLE replaced_negatives (pair_id VARCHAR, hn_ids VARCHAR[], replaced BIGINT);
