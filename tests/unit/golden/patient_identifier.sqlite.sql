SELECT r.pid 
FROM resource AS r 
WHERE r.res_type = 'Patient' AND r.deleted IS 0 AND r.pid IN (SELECT idx_token.pid 
FROM idx_token 
WHERE idx_token.hash_sys_value = -5865604583559274784) ORDER BY r.pid ASC
 LIMIT 21 OFFSET 0
