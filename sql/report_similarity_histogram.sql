-- Similarities of one encoder's retrieved neighbours (or candidates) in bins of width $width.
SELECT floor(sim / $width)::BIGINT AS bin, count(*) AS n
FROM read_parquet($path)
WHERE isfinite(sim)
GROUP BY bin
ORDER BY bin;
