SELECT
    (SELECT count(*) FROM read_parquet(getvariable('pairs_inputs').candidates)) AS candidate_rows,
    (SELECT count(*) FROM union_pairs) AS union_pairs,
    (SELECT count(*) FROM distinct_pairs) AS after_near_duplicates,
    (SELECT count(*) FROM capped_pairs) AS after_query_cap;
