-- counterfactual_verdicts: per query, the loss rise after removing its top-k attributed items against both controls:
-- the noise floor of the random removals (mean + floor_sds · sd of their rises; `passed`) and the rise after removing
-- k other items of its target artist plus the same margin (`item_floor`; `passed_item_level`: passed and above it).
-- The row query_id = '(all)' has the share of queries passing each, with the lower end of its 95% Wilson interval
-- (share_lower in views.sql); the asset check `attributed_removal_raises_query_loss_more` passes when more than half
-- pass item-level.
-- Rows of the current checkpoint and protocol only (current_identity).
-- params: (none)
WITH per_query AS (
    SELECT query_id, any_value(config_id) AS config_id, any_value(k) AS k, any_value(train_steps) AS train_steps,
           count(*) FILTER (WHERE removal = 'random') AS random_removals,
           any_value(loss_rise) FILTER (WHERE removal = 'attributed') AS attributed_rise,
           any_value(random_rise_mean) AS random_rise_mean, any_value(random_rise_sd) AS random_rise_sd,
           any_value(noise_floor) AS noise_floor, any_value(same_artist_rise) AS same_artist_rise,
           any_value(item_floor) AS item_floor, bool_and(passed) AS passed,
           bool_and(passed_item_level) AS passed_item_level
    FROM counterfactual SEMI JOIN current_identity USING (checkpoint_id, protocol_id)
    GROUP BY query_id
)
SELECT query_id, config_id, k, train_steps, random_removals, attributed_rise, random_rise_mean, random_rise_sd,
       noise_floor, same_artist_rise, item_floor, passed, passed_item_level,
       CAST(passed AS DOUBLE) AS share_passing, CAST(NULL AS DOUBLE) AS share_passing_low,
       CAST(passed_item_level AS DOUBLE) AS share_item_level, CAST(NULL AS DOUBLE) AS share_item_level_low
FROM per_query
UNION ALL
SELECT '(all)', any_value(config_id), any_value(k), any_value(train_steps), max(random_removals), avg(attributed_rise),
       avg(random_rise_mean), NULL, NULL, avg(same_artist_rise), NULL,
       avg(CAST(passed AS DOUBLE)) > 0.5, avg(CAST(passed_item_level AS DOUBLE)) > 0.5,
       avg(CAST(passed AS DOUBLE)), share_lower(count_if(passed), count(*)),
       avg(CAST(passed_item_level AS DOUBLE)), share_lower(count_if(passed_item_level), count(*))
FROM per_query
HAVING count(*) > 0
ORDER BY query_id = '(all)', query_id;
