SELECT len(encoders) AS n_encoders, count(*) AS pairs
FROM capped_pairs
GROUP BY 1
ORDER BY 1;
