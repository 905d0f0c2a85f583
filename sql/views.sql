-- The views over the storage root's parquet tables (DESIGN §3). Run by tda_assets/io/query_engine.py.
--
-- `{table:<name>}` is replaced by a read of every file of that table of the layout registry
-- (tda_assets/io/registry.py: its key pattern, hive partition columns and schema), or, while the table has
-- no files yet, by an empty relation with its columns: every view exists on a fresh root. Partition columns
-- live only in the hive folder names and stay VARCHAR (a query id like 0012 is a string, not a number).
-- No path is written here: the registry is the one place that spells the storage layout.
--
-- The views hold every identity (checkpoint_id, protocol_id: the first hive folders of each result table). The engine
-- also creates the one-row table `current_identity` (the checkpoint of checkpoint/current.json and the loss protocol
-- it was given): every named query keeps only its rows, `... SEMI JOIN current_identity USING (checkpoint_id,
-- protocol_id)`.

CREATE OR REPLACE VIEW training_items AS
SELECT item_id, audio_uri, caption, artist, duration_s, shard
FROM {table:training_manifest};

-- Identity columns: losses of different checkpoints or protocols never mix; filter on them.
CREATE OR REPLACE VIEW baseline_losses AS
SELECT checkpoint_id, protocol_id, shard, item_id, draw, t, loss, loss_masked
FROM {table:baseline_losses};

CREATE OR REPLACE VIEW queries AS
SELECT query_id, prompt, seed, audio_uri, target_artist, encoder_id, generated_by, source_rate, source_channels, seconds,
       windows
FROM {table:queries};

-- Every column of the engine's UnlearningSettings (the table's schema is derived from it).
CREATE OR REPLACE VIEW unlearning_configs AS
SELECT * FROM {table:unlearning_configs};

CREATE OR REPLACE VIEW unlearning_runs AS
SELECT query_id, config_id, query_loss_before, query_loss_after,
       query_loss_after / query_loss_before AS loss_ratio, delta_uri, seconds, lr_used, target_ratio, search_ratio, probes,
       checkpoint_id, protocol_id
FROM {table:unlearning_runs};

CREATE OR REPLACE VIEW unlearned_losses AS
SELECT checkpoint_id, protocol_id, query_id, config_id, item_id, draw, loss, loss_masked
FROM {table:unlearned_losses};

-- Unlearning scores (one file per query and configuration; method `unlearning` or `linearized`) and similarity
-- scores (one file per query and method, e.g. method=similarity:audio; config_id is NULL for them) as one view, each
-- row with the checkpoint and loss protocol it was computed with. `rescored`/`draws_used`: whether and on how many
-- protocol draws the item's exact score was computed (a two_stage configuration rescores its candidates only: the
-- others have a NULL score and rank after every rescored item; NULL for similarity).
CREATE OR REPLACE VIEW attributions AS
SELECT query_id, config_id, method, item_id, score, rank, relative_score, skew_score, share, checkpoint_id, protocol_id,
       rescored, draws_used
FROM {table:attribution_scores}
UNION ALL
SELECT query_id, CAST(NULL AS VARCHAR) AS config_id, method, item_id, score, rank,
       CAST(NULL AS DOUBLE) AS relative_score, CAST(NULL AS DOUBLE) AS skew_score, share, checkpoint_id, protocol_id,
       CAST(NULL AS BOOLEAN) AS rescored, CAST(NULL AS BIGINT) AS draws_used
FROM {table:similarity_scores};

-- The near-copy verdict of each query (tda_assets/attribution/near_copy.py states the rule): `segment` 'clip' is the
-- whole clip (scored as its similarity rows are; segment_start_s 0, segment_end_s its length),
-- 'window' one window of a clip longer than the model's window (which seconds copy which item). `copy_of` is the
-- closest item by `signal` even when `near_copy` is false; `margin` = copy_score − the rule's threshold. Every identity
-- is here: filter on current_identity as the named queries do.
CREATE OR REPLACE VIEW near_copies AS
SELECT query_id, segment, segment_start_s, segment_end_s, near_copy, copy_of, copy_score, margin, signal, checkpoint_id,
       protocol_id
FROM {table:near_copies};

-- `left` and `right` label the two rankings compared: `unlearning:<config_id>` or `similarity:<embedding>`.
-- They are SQL keywords: quote them ("left", "right") in queries.
CREATE OR REPLACE VIEW consistency AS
SELECT query_id, "left", "right", metric, k, value, checkpoint_id, protocol_id
FROM {table:consistency};

-- One row per (query, removal): `removal` is `attributed` (the query's top-k), `random` (k items outside every checked
-- query's top-k, `removal_seed`; the same retrained models for every query) or `same_artist` (k items of the query's
-- target artist outside its top-k: the item-level control). Every row of a query carries its verdicts: `noise_floor`
-- = random_rise_mean + floor_sds · random_rise_sd, `passed` = the attributed loss_rise is above it; `item_floor` =
-- same_artist_rise + floor_sds · random_rise_sd, `passed_item_level` = passed and above that too
-- (sql/counterfactual_verdicts.sql: one row per query).
CREATE OR REPLACE VIEW counterfactual AS
SELECT query_id, removal, removal_seed, k, query_loss_full, query_loss_removed, loss_rise, relative_rise,
       removed_of_target_artist, removed_items, config_id, train_steps, full_model, random_rise_mean, random_rise_sd,
       noise_floor, floor_sds, passed, same_artist_rise, item_floor, passed_item_level, checkpoint_id, protocol_id
FROM {table:counterfactual};

-- The self-influence protocol: one row per configuration and target (a training item unlearned as its own query).
-- `target_set`: `development` (the targets that tuned the defaults) or `reporting` (chosen outside them; the figures'
-- set); NULL for rows written before the two were kept apart.
CREATE OR REPLACE VIEW self_influence AS
SELECT config_id, target_set, target_item_id, rank, score, loss_ratio, lr_used, score_type, top_k_similarity,
       bottom_k_similarity, others_median_relative_change, checkpoint_id, protocol_id
FROM {table:self_influence};

-- Replication detection: a training item's audio after a mild transformation (at the file's own rate), used as a
-- query; the source's rank, `target_set` as for self_influence, `snr_db` of the transformed audio against the source in
-- the model's band and `latent_change` (relative RMS change of the latents): a transform that changes nothing shows.
CREATE OR REPLACE VIEW replication AS
SELECT config_id, target_set, source_item_id, transform, snr_db, latent_change, rank, score, loss_ratio, checkpoint_id,
       protocol_id
FROM {table:replication};

-- The lower end of the 95% Wilson score interval of a share `k / n`: what a share measured on few cases shows.
-- Four of four first shows a share of at least 0.51; a share of at least 0.95 needs 73 of 73.
CREATE OR REPLACE MACRO share_lower(k, n) AS
    (k / n + 1.959964 ^ 2 / (2 * n)
     - 1.959964 * sqrt((k / n) * (1 - k / n) / n + 1.959964 ^ 2 / (4 * n * n))) / (1 + 1.959964 ^ 2 / n);

-- The near-copy rule on known answers (tda_assets/defs/assets/near_copy.py): one row per copy `transform` on the
-- reporting sources of the current identity: `recall` = share of its copies flagged as copies of their own recording
-- (k of n) with `recall_low`, the lower end of its 95% Wilson interval; `false_positive_rate` = share of the reporting
-- non-copies (held-out clips of the same artists, generated clips) flagged, of `false_positive_n`, with
-- `false_positive_high`, the upper end of its interval. The development rows chose the threshold: never reported here.
CREATE OR REPLACE VIEW near_copy_summary AS
WITH rows AS (
    SELECT * FROM {table:near_copy_calibration} SEMI JOIN current_identity USING (checkpoint_id, protocol_id)
    WHERE target_set = 'reporting'
), fp AS (
    SELECT count(*) AS n, count(*) FILTER (WHERE near_copy) AS k FROM rows WHERE kind <> 'copy'
)
SELECT transform, count(*) AS n, count(*) FILTER (WHERE correct) AS k,
       count(*) FILTER (WHERE correct) / count(*) AS recall,
       share_lower(count(*) FILTER (WHERE correct), count(*)) AS recall_low,
       avg(snr_db) AS mean_snr_db, min(copy_score) AS min_copy_score,
       any_value(fp.k) / nullif(any_value(fp.n), 0) AS false_positive_rate, any_value(fp.n) AS false_positive_n,
       1 - share_lower(any_value(fp.n) - any_value(fp.k), nullif(any_value(fp.n), 0)) AS false_positive_high
FROM rows CROSS JOIN fp
WHERE kind = 'copy'
GROUP BY transform
ORDER BY transform;
