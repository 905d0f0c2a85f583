-- self_influence_summary: per configuration, the paper's R (mean rank of the target itself; 1.0 = always first),
-- the share ranked first and the lower end of its 95% interval (share_lower in views.sql), the loss-ratio spread,
-- the top-k / bottom-k embedding similarity and the median relative loss change of the other items (a model-quality
-- figure: a configuration that wrecks the model shows here).
-- params: (none)
SELECT config_id, score_type, count(*) AS targets, avg(rank) AS r_mean_rank, avg(CAST(rank = 1 AS DOUBLE)) AS share_first,
       share_lower(count_if(rank = 1), count(*)) AS share_first_low,
       max(loss_ratio) / min(loss_ratio) AS loss_ratio_spread, avg(top_k_similarity) AS top_k_similarity,
       avg(bottom_k_similarity) AS bottom_k_similarity, median(others_median_relative_change) AS others_relative_change
FROM self_influence
GROUP BY config_id, score_type
ORDER BY r_mean_rank, share_first DESC, config_id;
