-- The curators' rejects of this publish, from the Arrow tables registered as
-- rejected_pairs_table and rejected_images_table.
CREATE OR REPLACE TEMP TABLE rejected_pairs AS SELECT * FROM rejected_pairs_table;
CREATE OR REPLACE TEMP TABLE rejected_images AS SELECT * FROM rejected_images_table;
