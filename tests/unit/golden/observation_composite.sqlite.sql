SELECT r.pid 
FROM resource AS r 
WHERE r.res_type = 'Observation' AND r.deleted IS 0 AND r.pid IN (SELECT idx_token_1.pid 
FROM idx_token AS idx_token_1 JOIN idx_quantity AS idx_quantity_1 ON idx_quantity_1.pid = idx_token_1.pid AND idx_quantity_1.grp = idx_token_1.grp 
WHERE idx_token_1.hash_value = 7758804617892392350 AND idx_quantity_1.hash_identity = 5691443775198284480 AND idx_quantity_1.value > 70.0) ORDER BY r.pid ASC
 LIMIT 21 OFFSET 0
