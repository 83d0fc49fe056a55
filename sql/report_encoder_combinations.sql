-- Pairs by the exact set of encoders (views) that found them.
SELECT len(encoders) AS views, array_to_string(encoders, ' + ') AS combination, count(*) AS pairs
FROM read_parquet($paths)
GROUP BY views, combination
ORDER BY views, pairs DESC, combination;
