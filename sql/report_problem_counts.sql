-- Quarantine or failure rows by stage and reason, with one example detail each.
SELECT stage, reason, count(*) AS n, min(detail) AS example
FROM read_parquet($paths, union_by_name = true)
GROUP BY stage, reason
ORDER BY n DESC, stage, reason;
