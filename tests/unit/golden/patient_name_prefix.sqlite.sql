SELECT r.pid 
FROM resource AS r 
WHERE r.res_type = 'Patient' AND r.deleted IS 0 AND r.pid IN (SELECT idx_string.pid 
FROM idx_string 
WHERE idx_string.hash_identity = 3503648001311067228 AND idx_string.value_norm >= 'mul' AND idx_string.value_norm < 'mum') ORDER BY r.pid ASC
 LIMIT 21 OFFSET 0
