-- (source rows, rows repeating a key, rows whose key names no image of this corpus)
SELECT count(*), count(k) - count(DISTINCT k),
       count(*) FILTER (WHERE k IS NULL OR k NOT IN (SELECT k FROM image_keys))
FROM src
