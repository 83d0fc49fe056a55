-- How many instructions each triplet carries.
SELECT coalesce(len(q_text), 0) AS n, count(*) AS pairs
FROM instruction_source
GROUP BY n
ORDER BY n;
