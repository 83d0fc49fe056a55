-- The pairs curation withholds from this publish, one failure row each.
SELECT * FROM curation_exclusions ORDER BY pair_id;
