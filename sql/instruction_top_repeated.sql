-- The instructions held by the most triplets (the template-collapse detector), with one verbatim
-- example of each.
SELECT norm, min(text) AS example, count(DISTINCT pair_id) AS pairs
FROM instruction_rows
GROUP BY norm
ORDER BY pairs DESC, norm
LIMIT $top;
