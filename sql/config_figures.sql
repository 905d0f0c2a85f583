-- config_figures: per configuration, the figures that choose the default: self-influence R and share ranked first,
-- the query-loss-ratio spread (max / min over its queries), the replication first-rank rate, and the target
-- artist's precision@k on the built-in (held-out) prompts. Ordered best first by self-influence.
-- params: k = 10
WITH si AS (
    SELECT config_id, count(*) AS si_targets, avg(rank) AS r_mean_rank, avg(CAST(rank = 1 AS DOUBLE)) AS si_share_first
    FROM self_influence GROUP BY config_id
),
runs AS (
    SELECT config_id, count(*) AS queries, max(loss_ratio) / min(loss_ratio) AS loss_ratio_spread
    FROM unlearning_runs GROUP BY config_id
),
rep AS (
    SELECT config_id, count(*) AS replication_queries, avg(CAST(rank = 1 AS DOUBLE)) AS replication_first
    FROM replication GROUP BY config_id
),
prec AS (
    SELECT a.config_id, avg(CAST(t.artist = q.target_artist AS DOUBLE)) AS artist_precision_at_k
    FROM attributions AS a
    JOIN queries AS q ON q.query_id = a.query_id
    LEFT JOIN training_items AS t ON t.item_id = a.item_id
    WHERE a.method = 'unlearning' AND a.rank <= $k AND q.target_artist IS NOT NULL
    GROUP BY a.config_id
)
SELECT runs.config_id, runs.queries, si.si_targets, si.r_mean_rank, si.si_share_first, runs.loss_ratio_spread,
       rep.replication_queries, rep.replication_first, prec.artist_precision_at_k
FROM runs
LEFT JOIN si ON si.config_id = runs.config_id
LEFT JOIN rep ON rep.config_id = runs.config_id
LEFT JOIN prec ON prec.config_id = runs.config_id
ORDER BY si.r_mean_rank NULLS LAST, si.si_share_first DESC NULLS LAST, runs.config_id;
