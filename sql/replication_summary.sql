-- replication_summary: per configuration and transform, how often the source item of a transformed clip ranks first
-- (the goal: every transform ranks its source first in at least 95% of cases), the lower end of that share's 95%
-- interval (share_lower in views.sql: a few sources show little), and the mean and worst rank. `failed`: clips whose
-- unlearning missed the ×1.05 minimum (rank null: not ranked, and counted as not first).
-- Rows of the current checkpoint and protocol only (current_identity), and per transform only the sources every
-- configuration measured, so configurations are compared on the same clips; reporting sources only (`target_set`).
-- `snr_db`: the transform's mean SNR against its source in the model's band (a transform above ~35 dB changes little
-- the model hears), `latent_change` the mean relative RMS change of the query's latents.
-- params: (none)
WITH cur AS (
    SELECT * FROM replication SEMI JOIN current_identity USING (checkpoint_id, protocol_id)
    WHERE target_set = 'reporting'
),
common AS (
    SELECT transform, source_item_id FROM cur GROUP BY transform, source_item_id
    HAVING count(DISTINCT config_id) = (SELECT count(DISTINCT config_id) FROM cur)
)
SELECT config_id, transform, avg(snr_db) AS snr_db, avg(latent_change) AS latent_change, count(*) AS sources,
       count_if(rank IS NULL) AS failed, count_if(rank = 1) / count(*) AS share_first,
       share_lower(count_if(rank = 1), count(*)) AS share_first_low,
       avg(rank) AS mean_rank, max(rank) AS worst_rank
FROM cur SEMI JOIN common USING (transform, source_item_id)
GROUP BY config_id, transform
ORDER BY config_id, transform;
