SELECT version FROM versions WHERE version <> $version ORDER BY published_at DESC LIMIT 1;
