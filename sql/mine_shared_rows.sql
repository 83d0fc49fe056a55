-- Incremental mining: image ids both runs embedded, as (this run's row, the parent's row), in this
-- run's row order (vectors are then read nearly sequentially).
SELECT c.file_row_number AS cur_row, p.file_row_number AS par_row
FROM read_parquet($current_ids, file_row_number = true) AS c
JOIN read_parquet($parent_ids, file_row_number = true) AS p ON p.image_id = c.image_id
ORDER BY cur_row;
