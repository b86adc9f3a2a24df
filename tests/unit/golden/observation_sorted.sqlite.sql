SELECT r.pid, coalesce((SELECT max(idx_date_1.low) AS max_1 
FROM idx_date AS idx_date_1 
WHERE idx_date_1.pid = r.pid AND idx_date_1.hash_identity IN (5721484046655113038)), -4611686018427387904) AS k0 
FROM resource AS r 
WHERE r.res_type = 'Observation' AND r.deleted IS 0 AND r.pid IN (SELECT idx_token.pid 
FROM idx_token 
WHERE idx_token.hash_value = -8595123896578515915) ORDER BY coalesce((SELECT max(idx_date_1.low) AS max_1 
FROM idx_date AS idx_date_1 
WHERE idx_date_1.pid = r.pid AND idx_date_1.hash_identity IN (5721484046655113038)), -4611686018427387904) DESC, r.pid ASC
 LIMIT 21 OFFSET 0
