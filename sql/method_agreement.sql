-- method_agreement: per query, how far unlearning agrees with each similarity method, and the mean over queries.
-- Unlearning = configuration $config_id (NULL = every configuration). From the consistency view: Jaccard@10/50/100,
-- Spearman, Pearson per query, then their mean (query_id = '(mean)', n_queries = how many queries it averages).
-- Rows whose one side is `similarity:<embedding>` and the other `unlearning:<config_id>` (or a bare config id).
-- Rows of the current checkpoint and protocol only (current_identity); the '(mean)' rows average over the queries every
-- (configuration, method) shown has, so they compare on the same queries.
-- params: config_id = null
WITH pairs AS (
    SELECT query_id, metric, k, value,
           CASE WHEN "right" LIKE 'similarity:%' THEN "left" ELSE "right" END AS unlearning,
           CASE WHEN "right" LIKE 'similarity:%' THEN "right" ELSE "left" END AS method
    FROM consistency SEMI JOIN current_identity USING (checkpoint_id, protocol_id)
    WHERE ("left" LIKE 'similarity:%') <> ("right" LIKE 'similarity:%')
),
labelled AS (
    SELECT *, CASE WHEN unlearning LIKE 'unlearning:%' THEN substr(unlearning, 12) ELSE unlearning END AS config_id
    FROM pairs
),
per_query AS (
    SELECT query_id, config_id, method, 1 AS n_queries,
           avg(value) FILTER (WHERE metric = 'jaccard' AND k = 10) AS jaccard_10,
           avg(value) FILTER (WHERE metric = 'jaccard' AND k = 50) AS jaccard_50,
           avg(value) FILTER (WHERE metric = 'jaccard' AND k = 100) AS jaccard_100,
           avg(value) FILTER (WHERE metric = 'spearman') AS spearman,
           avg(value) FILTER (WHERE metric = 'pearson') AS pearson
    FROM labelled
    WHERE $config_id IS NULL OR config_id = $config_id
    GROUP BY query_id, config_id, method
),
common AS (
    SELECT query_id FROM per_query GROUP BY query_id
    HAVING count(DISTINCT (config_id, method)) = (SELECT count(DISTINCT (config_id, method)) FROM per_query)
)
SELECT * FROM per_query
UNION ALL
SELECT '(mean)' AS query_id, config_id, method, count(*) AS n_queries,
       avg(jaccard_10), avg(jaccard_50), avg(jaccard_100), avg(spearman), avg(pearson)
FROM per_query SEMI JOIN common USING (query_id)
GROUP BY config_id, method
ORDER BY config_id, method, query_id = '(mean)', query_id;
