-- Each query's retrieved set (any encoder, below that encoder's upper band edge so no near-duplicate
-- of the query, never the query itself), once per query that has pairs, in a seeded random order:
-- by draw_key(q) XOR draw_key(n). Both keys are uniform and independent, so for every query this is
-- a uniformly random order of its retrieved set, and the same seed always gives the same order.
-- Sorting the keys alone (list_grade_up) and gathering the items is much cheaper than sorting structs.
CREATE OR REPLACE TEMP TABLE query_pools AS
WITH queries AS (
    SELECT DISTINCT p.q_id, i.draw_key
    FROM capped_pairs AS p
    JOIN images AS i ON i.image_id = p.q_id
),
retrieved AS (
    SELECT n.q_id, list({'draw': xor(q.draw_key, ni.draw_key), 'id': n.n_id, 'phash': ni.phash}) AS items
    FROM neighbours AS n
    JOIN bands AS b ON b.encoder = n.encoder
    JOIN queries AS q ON q.q_id = n.q_id
    JOIN images AS ni ON ni.image_id = n.n_id
    WHERE n.sim < b.hi
      AND n.n_id <> n.q_id
    GROUP BY n.q_id
),
ordered AS (
    SELECT q_id, list_transform(list_grade_up(list_transform(items, lambda x: x.draw)), lambda i: items[i]) AS items
    FROM retrieved
)
SELECT
    q_id,
    -- An image retrieved by several encoders has one draw, so its copies are adjacent: keep one.
    list_filter(items, lambda x, i: i = 1 OR x.id <> items[i - 1].id) AS drawn
FROM ordered;
