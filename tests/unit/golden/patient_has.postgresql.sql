SELECT r.pid 
FROM resource AS r 
WHERE r.res_type = 'Patient' AND r.deleted IS false AND r.pid IN (SELECT resource_1.pid 
FROM idx_reference AS idx_reference_1 JOIN resource AS resource_1 ON resource_1.res_type = idx_reference_1.target_type AND resource_1.res_id = idx_reference_1.target_id 
WHERE idx_reference_1.hash_identity = 4307650559277313507 AND resource_1.res_type IN ('Patient') AND idx_reference_1.pid IN (SELECT resource_2.pid 
FROM resource AS resource_2 
WHERE resource_2.res_type IN ('Observation') AND resource_2.deleted IS false AND resource_2.pid IN (SELECT idx_token.pid 
FROM idx_token 
WHERE idx_token.hash_sys_value = 9048326286646364981))) ORDER BY r.pid ASC 
 LIMIT 21
