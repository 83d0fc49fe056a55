-- Incremental mining: the parent's retrieved sets (first k per query) in the parent's row numbers.
SELECT q.file_row_number AS q_row, t.file_row_number AS t_row, n.sim, n.rank
FROM read_parquet($neighbours) AS n
JOIN read_parquet($ids, file_row_number = true) AS q ON q.image_id = n.q_id
JOIN read_parquet($ids, file_row_number = true) AS t ON t.image_id = n.t_id
WHERE n.rank <= $k;
