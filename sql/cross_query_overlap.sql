-- cross_query_overlap: per ranking (`unlearning:<config_id>` or `similarity:<embedding>`), the mean Jaccard@k between
-- the top-k items of every two queries with different target artists (queries without a target artist, i.e. users'
-- queries, are left out). Low: each query gets its own items; high: the ranking returns the same "generally
-- influential" items whatever the query. consistency_report records the same figure (k = 10) in its metadata.
-- Rows of the current checkpoint and protocol only (current_identity).
-- params: k = 10
WITH top AS (
    SELECT CASE WHEN a.config_id IS NOT NULL THEN 'unlearning:' || a.config_id ELSE a.method END AS ranking,
           a.query_id, q.target_artist, a.item_id, a.checkpoint_id, a.protocol_id
    FROM attributions AS a SEMI JOIN current_identity USING (checkpoint_id, protocol_id)
    JOIN queries AS q ON q.query_id = a.query_id
    WHERE a.rank <= $k AND q.target_artist IS NOT NULL
),
sizes AS (
    SELECT ranking, checkpoint_id, protocol_id, query_id, any_value(target_artist) AS target_artist, count(*) AS n
    FROM top
    GROUP BY ranking, checkpoint_id, protocol_id, query_id
),
query_pairs AS (
    SELECT a.ranking, a.checkpoint_id, a.protocol_id, a.query_id AS left_query, b.query_id AS right_query,
           a.n AS n_left, b.n AS n_right
    FROM sizes AS a
    JOIN sizes AS b ON a.ranking = b.ranking AND a.checkpoint_id = b.checkpoint_id AND a.protocol_id = b.protocol_id
                   AND a.query_id < b.query_id AND a.target_artist <> b.target_artist
),
shared AS (
    SELECT x.ranking, x.checkpoint_id, x.protocol_id, x.query_id AS left_query, y.query_id AS right_query,
           count(*) AS n_shared
    FROM top AS x
    JOIN top AS y ON x.ranking = y.ranking AND x.checkpoint_id = y.checkpoint_id AND x.protocol_id = y.protocol_id
                 AND x.item_id = y.item_id AND x.query_id < y.query_id
    GROUP BY x.ranking, x.checkpoint_id, x.protocol_id, x.query_id, y.query_id
),
per_pair AS (
    SELECT p.*, coalesce(s.n_shared, 0) AS n_shared
    FROM query_pairs AS p
    LEFT JOIN shared AS s USING (ranking, checkpoint_id, protocol_id, left_query, right_query)
)
SELECT ranking, CAST($k AS BIGINT) AS k,
       avg(n_shared / (n_left + n_right - n_shared)) AS cross_query_jaccard,
       count(*) AS query_pairs,
       (SELECT count(*) FROM sizes AS s WHERE s.ranking = per_pair.ranking AND s.checkpoint_id = per_pair.checkpoint_id
                                          AND s.protocol_id = per_pair.protocol_id) AS queries,
       checkpoint_id, protocol_id
FROM per_pair
GROUP BY ranking, checkpoint_id, protocol_id
ORDER BY ranking, checkpoint_id, protocol_id;
