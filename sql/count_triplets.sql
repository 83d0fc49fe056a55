SELECT count(*) FROM read_parquet($triplets);
