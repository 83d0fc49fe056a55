INSERT OR REPLACE INTO versions
VALUES ($version, $parent, $run_dir, $run_id, $published_at, $triplets, $added, $manifest);
