-- top_k: the top $k items of every query, per method and configuration, with each item's artist and caption.
-- Also shows the query's target artist (the artist a built-in prompt was written from; NULL for user queries).
-- Rows of the current checkpoint and protocol only (current_identity).
-- params: k = 10
SELECT a.query_id, q.target_artist, a.method, a.config_id, a.rank, a.item_id, t.artist, t.caption, a.score, a.share
FROM attributions AS a SEMI JOIN current_identity USING (checkpoint_id, protocol_id)
LEFT JOIN training_items AS t ON t.item_id = a.item_id
LEFT JOIN queries AS q ON q.query_id = a.query_id
WHERE a.rank <= $k
ORDER BY a.query_id, a.method, a.config_id NULLS FIRST, a.rank;
