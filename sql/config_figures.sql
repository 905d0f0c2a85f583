-- config_figures: per configuration, the figures that choose the default: self-influence R and share ranked first,
-- the query-loss-ratio spread (max / min over its queries), the replication first-rank rate, and the target
-- artist's precision@k on the built-in (held-out) prompts. Ordered best first by self-influence.
-- Rows of the current checkpoint and protocol only (current_identity), each figure over what every configuration has:
-- the queries all of them ran (runs, precision), the targets all were judged on, the (source, transform) pairs all
-- were measured on; `queries`, `si_targets`, `replication_queries` count that common set.
-- params: k = 10
WITH run_rows AS (
    SELECT * FROM unlearning_runs SEMI JOIN current_identity USING (checkpoint_id, protocol_id)
),
common_queries AS (
    SELECT query_id FROM run_rows GROUP BY query_id
    HAVING count(DISTINCT config_id) = (SELECT count(DISTINCT config_id) FROM run_rows)
),
si_rows AS (  -- reporting targets only (outside the development targets that tuned the defaults)
    SELECT * FROM self_influence SEMI JOIN current_identity USING (checkpoint_id, protocol_id)
    WHERE target_set = 'reporting'
),
si_common AS (
    SELECT target_item_id FROM si_rows GROUP BY target_item_id
    HAVING count(DISTINCT config_id) = (SELECT count(DISTINCT config_id) FROM si_rows)
),
rep_rows AS (  -- reporting sources only
    SELECT * FROM replication SEMI JOIN current_identity USING (checkpoint_id, protocol_id)
    WHERE target_set = 'reporting'
),
rep_common AS (
    SELECT source_item_id, transform FROM rep_rows GROUP BY source_item_id, transform
    HAVING count(DISTINCT config_id) = (SELECT count(DISTINCT config_id) FROM rep_rows)
),
si AS (
    SELECT config_id, count(*) AS si_targets, avg(rank) AS r_mean_rank, avg(CAST(rank = 1 AS DOUBLE)) AS si_share_first
    FROM si_rows SEMI JOIN si_common USING (target_item_id) GROUP BY config_id
),
runs AS (
    SELECT config_id, count(*) AS queries, max(loss_ratio) / min(loss_ratio) AS loss_ratio_spread
    FROM run_rows SEMI JOIN common_queries USING (query_id) GROUP BY config_id
),
rep AS (
    SELECT config_id, count(*) AS replication_queries, avg(CAST(rank = 1 AS DOUBLE)) AS replication_first
    FROM rep_rows SEMI JOIN rep_common USING (source_item_id, transform) GROUP BY config_id
),
prec AS (
    SELECT a.config_id, avg(CAST(t.artist = q.target_artist AS DOUBLE)) AS artist_precision_at_k
    FROM attributions AS a SEMI JOIN current_identity USING (checkpoint_id, protocol_id)
    SEMI JOIN common_queries USING (query_id)
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
