-- consistency_table: the paper-style table, mean Jaccard@10/50/100 and Spearman over queries per pair of rankings.
-- One row per pair (left, right; the order of the pair does not matter), also Pearson and n_queries.
-- Labels: `unlearning:<config_id>` (configurations, seed reruns) or `similarity:<embedding>`.
-- params: (none)
SELECT least("left", "right") AS "left", greatest("left", "right") AS "right",
       avg(value) FILTER (WHERE metric = 'jaccard' AND k = 10) AS jaccard_10,
       avg(value) FILTER (WHERE metric = 'jaccard' AND k = 50) AS jaccard_50,
       avg(value) FILTER (WHERE metric = 'jaccard' AND k = 100) AS jaccard_100,
       avg(value) FILTER (WHERE metric = 'spearman') AS spearman,
       avg(value) FILTER (WHERE metric = 'pearson') AS pearson,
       count(DISTINCT query_id) AS n_queries
FROM consistency
GROUP BY least("left", "right"), greatest("left", "right")
ORDER BY 1, 2;
