-- artist_shares: per query, method and configuration, each artist's share of the top $k items.
-- share = the artist's fraction of the top-k items; credit = the sum of their `share` (credit) weights;
-- artist_rank 1 = the top artist; top_artist_is_target = whether it is the query's target artist.
-- Rows of the current checkpoint and protocol only (current_identity).
-- params: k = 10
WITH top AS (
    SELECT a.query_id, a.method, a.config_id, coalesce(t.artist, '(unknown)') AS artist, a.share
    FROM attributions AS a SEMI JOIN current_identity USING (checkpoint_id, protocol_id)
    LEFT JOIN training_items AS t ON t.item_id = a.item_id
    WHERE a.rank <= $k
),
per_artist AS (
    SELECT query_id, method, config_id, artist, count(*) AS n_items, sum(share) AS credit
    FROM top
    GROUP BY query_id, method, config_id, artist
),
ranked AS (
    SELECT *,
           n_items / sum(n_items) OVER w AS share,
           row_number() OVER (w ORDER BY n_items DESC, credit DESC, artist) AS artist_rank
    FROM per_artist
    WINDOW w AS (PARTITION BY query_id, method, config_id)
)
SELECT r.query_id, q.target_artist, r.method, r.config_id, r.artist_rank, r.artist, r.n_items, r.share, r.credit,
       max(CASE WHEN r.artist_rank = 1 THEN r.artist END)
           OVER (PARTITION BY r.query_id, r.method, r.config_id) = q.target_artist AS top_artist_is_target
FROM ranked AS r
LEFT JOIN queries AS q ON q.query_id = r.query_id
ORDER BY r.query_id, r.method, r.config_id NULLS FIRST, r.artist_rank;
