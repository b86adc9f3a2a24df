SELECT r.pid 
FROM resource AS r 
WHERE r.res_type = 'Observation' AND r.deleted IS false AND r.pid IN (SELECT idx_reference_1.pid 
FROM idx_reference AS idx_reference_1 JOIN resource AS resource_1 ON resource_1.res_type = idx_reference_1.target_type AND resource_1.res_id = idx_reference_1.target_id 
WHERE idx_reference_1.hash_identity = 4307650559277313507 AND resource_1.res_type IN ('Patient') AND resource_1.deleted IS false AND resource_1.pid IN (SELECT idx_string.pid 
FROM idx_string 
WHERE idx_string.hash_identity = 3503648001311067228 AND idx_string.value_norm >= 'anna' AND idx_string.value_norm < 'annb')) AND r.pid IN (SELECT idx_date.pid 
FROM idx_date 
WHERE idx_date.hash_identity = 5721484046655113038 AND (idx_date.high > 1609459199999 OR idx_date.low >= 1577836800000 AND idx_date.low <= 1609459199999 AND idx_date.high <= 1609459199999)) ORDER BY r.pid ASC 
 LIMIT 21
