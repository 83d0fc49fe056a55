-- (images with a vector of their own, images whose vector another image also claims)
SELECT count(*) FILTER (WHERE claims = 1), count(*) FILTER (WHERE claims > 1) FROM matched
