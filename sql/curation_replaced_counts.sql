-- Hard negatives replaced, and the pairs that had any replaced.
SELECT coalesce(sum(replaced), 0) AS negatives_replaced, count(*) AS pairs_with_replaced_negatives
FROM replaced_negatives;
