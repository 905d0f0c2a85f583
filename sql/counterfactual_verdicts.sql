-- counterfactual_verdicts: per query, the loss rise after removing its top-k attributed items against the noise floor
-- of its random removals (mean + floor_sds · sd of their rises), the verdict, and the share of queries passing
-- (query_id = '(all)'; the asset check `attributed_removal_raises_query_loss_more` passes when more than half pass).
-- params: (none)
WITH per_query AS (
    SELECT query_id, any_value(config_id) AS config_id, any_value(k) AS k, any_value(train_steps) AS train_steps,
           count(*) FILTER (WHERE removal = 'random') AS random_removals,
           any_value(loss_rise) FILTER (WHERE removal = 'attributed') AS attributed_rise,
           any_value(random_rise_mean) AS random_rise_mean, any_value(random_rise_sd) AS random_rise_sd,
           any_value(noise_floor) AS noise_floor, bool_and(passed) AS passed
    FROM counterfactual
    GROUP BY query_id
)
SELECT query_id, config_id, k, train_steps, random_removals, attributed_rise, random_rise_mean, random_rise_sd,
       noise_floor, passed, CAST(passed AS DOUBLE) AS share_passing
FROM per_query
UNION ALL
SELECT '(all)', any_value(config_id), any_value(k), any_value(train_steps), sum(random_removals), avg(attributed_rise),
       avg(random_rise_mean), NULL, NULL, avg(CAST(passed AS DOUBLE)) > 0.5, avg(CAST(passed AS DOUBLE))
FROM per_query
HAVING count(*) > 0
ORDER BY query_id = '(all)', query_id;
