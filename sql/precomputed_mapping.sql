-- The mapping file: per image row, the vector file and row it reads (file -1: ambiguous).
SELECT row::BIGINT AS row, CASE WHEN claims = 1 THEN file ELSE -1 END::INTEGER AS file, frow::BIGINT AS frow
FROM matched
ORDER BY row
