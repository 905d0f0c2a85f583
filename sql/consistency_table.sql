-- consistency_table: the paper-style table, mean Jaccard@10/50/100 and Spearman over queries per pair of rankings.
-- One row per pair (left, right; the order of the pair does not matter), also Pearson and n_queries.
-- Labels: `unlearning:<config_id>` (configurations, seed reruns) or `similarity:<embedding>`.
-- `pair` says what is compared: `seed rerun` (two configurations equal in every field of unlearning_configs but
-- their seed, and of different seeds: an identical configuration under another name is not a rerun), `configurations`
-- (two unlearning configurations), `unlearning vs similarity`, or `similarity methods`.
-- Rows of the current checkpoint and protocol only (current_identity), over the queries every pair was measured on, so
-- the pairs are compared on the same queries (a default run on 8 queries and a grid on 4 of them: those 4).
-- params: (none)
WITH families AS (
    SELECT config_id, seed, to_json(struct_pack(*COLUMNS(* EXCLUDE (config_id, seed)))) AS family
    FROM unlearning_configs
),
pairs AS (
    SELECT least("left", "right") AS l, greatest("left", "right") AS r, query_id, metric, k, value
    FROM consistency SEMI JOIN current_identity USING (checkpoint_id, protocol_id)
),
common AS (
    SELECT query_id FROM pairs GROUP BY query_id
    HAVING count(DISTINCT (l, r)) = (SELECT count(DISTINCT (l, r)) FROM pairs)
),
agg AS (
    SELECT l, r,
           avg(value) FILTER (WHERE metric = 'jaccard' AND k = 10) AS jaccard_10,
           avg(value) FILTER (WHERE metric = 'jaccard' AND k = 50) AS jaccard_50,
           avg(value) FILTER (WHERE metric = 'jaccard' AND k = 100) AS jaccard_100,
           avg(value) FILTER (WHERE metric = 'spearman') AS spearman,
           avg(value) FILTER (WHERE metric = 'pearson') AS pearson,
           count(DISTINCT query_id) AS n_queries
    FROM pairs SEMI JOIN common USING (query_id)
    GROUP BY l, r
)
SELECT a.l AS "left", a.r AS "right",
       CASE
           WHEN a.l LIKE 'unlearning:%' AND a.r LIKE 'unlearning:%' AND cl.family = cr.family AND cl.seed <> cr.seed
               THEN 'seed rerun'
           WHEN a.l LIKE 'unlearning:%' AND a.r LIKE 'unlearning:%' THEN 'configurations'
           WHEN a.l LIKE 'similarity:%' AND a.r LIKE 'similarity:%' THEN 'similarity methods'
           ELSE 'unlearning vs similarity'
       END AS pair,
       a.jaccard_10, a.jaccard_50, a.jaccard_100, a.spearman, a.pearson, a.n_queries
FROM agg AS a
LEFT JOIN families AS cl ON a.l = 'unlearning:' || cl.config_id
LEFT JOIN families AS cr ON a.r = 'unlearning:' || cr.config_id
ORDER BY "left", "right";
