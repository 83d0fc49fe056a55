-- No retrieved sets to draw replacement negatives from: every pair needing one is withheld.
CREATE OR REPLACE TEMP TABLE replaced_negatives (pair_id VARCHAR, hn_ids VARCHAR[], replaced BIGINT);
