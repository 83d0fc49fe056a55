-- Triplets in the released MegaPairs record format (q_img, q_text, t_img, hns with hns[0] = q_img)
-- plus provenance. Only annotated pairs are published, less those a curator withheld.
SELECT
    qi.path AS q_img,
    a.instructions AS q_text,
    ti.path AS t_img,
    list_prepend(qi.path, coalesce(h.hn_paths, [])) AS hns,
    p.pair_id,
    p.q_id,
    p.t_id,
    p.encoders,
    p.sims,
    a.description,
    a.word_num,
    a.describe_model,
    a.instruct_model,
    a.describe_backend,
    a.instruct_backend,
    a.prompt_version,
    $run_id AS run_id
FROM read_parquet($pairs) AS p
JOIN read_parquet($annotations) AS a USING (pair_id)
JOIN read_parquet($images) AS qi ON qi.image_id = p.q_id
JOIN read_parquet($images) AS ti ON ti.image_id = p.t_id
LEFT JOIN hard_negative_paths AS h USING (pair_id)
ANTI JOIN curation_exclusions AS x ON x.pair_id = p.pair_id
ORDER BY p.pair_id;
