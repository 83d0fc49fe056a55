SELECT parent, published_at FROM versions WHERE version = $version;
