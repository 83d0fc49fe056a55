SELECT len(encoders) AS n_encoders, count(*) AS pairs
FROM pair_negatives
GROUP BY 1
ORDER BY 1;
