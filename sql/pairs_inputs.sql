-- The stage's input files and the near-duplicate threshold, set once so that views (which take no
-- parameters) can read them.
SET VARIABLE pairs_inputs = {
    'candidates': $candidates,
    'neighbours': $neighbours,
    'images': $images,
    'max_hamming': $max_hamming
};
