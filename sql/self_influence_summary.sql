-- self_influence_summary: per configuration, the paper's R (mean rank of the target itself; 1.0 = always first),
-- the share ranked first and the lower end of its 95% interval (share_lower in views.sql), the loss-ratio spread,
-- the top-k / bottom-k embedding similarity and the median relative loss change of the other items (a model-quality
-- figure: a configuration that wrecks the model shows here). `failed`: targets whose unlearning missed the ×1.05
-- minimum (rank null: not ranked; R is over the ranked ones, share_first over all, a failure counting as not first).
-- Rows of the current checkpoint and protocol only (current_identity), and only the targets every configuration
-- measured, so configurations are compared on the same targets; reporting targets only (`target_set`: chosen outside
-- the development targets that tuned the defaults). Ordered by the rule that chooses a configuration: R, then the
-- higher share-first lower end, then the smaller loss-ratio spread, then the config id.
-- params: (none)
WITH cur AS (
    SELECT * FROM self_influence SEMI JOIN current_identity USING (checkpoint_id, protocol_id)
    WHERE target_set = 'reporting'
),
common AS (
    SELECT target_item_id FROM cur GROUP BY target_item_id
    HAVING count(DISTINCT config_id) = (SELECT count(DISTINCT config_id) FROM cur)
)
SELECT config_id, score_type, count(*) AS targets, count_if(rank IS NULL) AS failed, avg(rank) AS r_mean_rank,
       count_if(rank = 1) / count(*) AS share_first,
       share_lower(count_if(rank = 1), count(*)) AS share_first_low,
       max(loss_ratio) / min(loss_ratio) AS loss_ratio_spread, avg(top_k_similarity) AS top_k_similarity,
       avg(bottom_k_similarity) AS bottom_k_similarity, median(others_median_relative_change) AS others_relative_change
FROM cur SEMI JOIN common USING (target_item_id)
GROUP BY config_id, score_type
ORDER BY r_mean_rank, share_first_low DESC, loss_ratio_spread, config_id;
