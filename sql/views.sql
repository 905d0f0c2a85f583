-- The views over the storage root's parquet tables (DESIGN §3). Run by resources/query_engine.py.
--
-- {root} is replaced by the storage root (a local path or s3://bucket/prefix). Partition columns live
-- only in the hive folder names and stay VARCHAR (a query id like 0012 is a string, not a number).
-- When a table has no files yet, the engine replaces its read_parquet('{root}/<table>/…', …) call by an
-- empty relation with the table's columns, so every view exists on a fresh root (with 0 rows).
-- Keep each table read as read_parquet('{root}/<table>/…', …) with no ')' inside the call.

CREATE OR REPLACE VIEW training_items AS
SELECT item_id, audio_uri, caption, artist, duration_s, shard
FROM read_parquet('{root}/training_manifest/part-*.parquet');

CREATE OR REPLACE VIEW baseline_losses AS
SELECT shard, checkpoint_id, protocol_id, item_id, draw, t, loss
FROM read_parquet('{root}/baseline_losses/*/part-*.parquet',
                  hive_partitioning = true, hive_types = {'shard': VARCHAR});

CREATE OR REPLACE VIEW queries AS
SELECT query_id, prompt, seed, audio_uri, target_artist
FROM read_parquet('{root}/queries/*/part-*.parquet',
                  hive_partitioning = true, hive_types = {'query_id': VARCHAR});

CREATE OR REPLACE VIEW unlearning_configs AS
SELECT config_id, recipe, lr, steps, "lambda", param_subset, seed, optimizer, query_draws, damping, mask_padding
FROM read_parquet('{root}/unlearning_configs/*/part-*.parquet',
                  hive_partitioning = true, hive_types = {'config_id': VARCHAR});

CREATE OR REPLACE VIEW unlearning_runs AS
SELECT query_id, config_id, query_loss_before, query_loss_after,
       query_loss_after / query_loss_before AS loss_ratio, delta_uri, seconds
FROM read_parquet('{root}/unlearning_runs/*/*/part-*.parquet',
                  hive_partitioning = true, hive_types = {'query_id': VARCHAR, 'config_id': VARCHAR});

CREATE OR REPLACE VIEW unlearned_losses AS
SELECT query_id, config_id, item_id, draw, loss
FROM read_parquet('{root}/unlearned_losses/*/*/part-*.parquet',
                  hive_partitioning = true, hive_types = {'query_id': VARCHAR, 'config_id': VARCHAR});

-- Unlearning scores (one folder per query and configuration) and similarity scores (one folder per query
-- and method, e.g. method=similarity:audio; config_id is NULL for them) as one view.
CREATE OR REPLACE VIEW attributions AS
SELECT query_id, config_id, method, item_id, score, rank, relative_score, skew_score, share
FROM read_parquet('{root}/attribution_scores/*/*/part-*.parquet',
                  hive_partitioning = true, hive_types = {'query_id': VARCHAR, 'config_id': VARCHAR})
UNION ALL
SELECT query_id, CAST(NULL AS VARCHAR) AS config_id, method, item_id, score, rank,
       CAST(NULL AS DOUBLE) AS relative_score, CAST(NULL AS DOUBLE) AS skew_score, share
FROM read_parquet('{root}/similarity_scores/*/*/part-*.parquet',
                  hive_partitioning = true, hive_types = {'query_id': VARCHAR, 'method': VARCHAR});

-- `left` and `right` label the two rankings compared: `unlearning:<config_id>` or `similarity:<embedding>`.
-- They are SQL keywords: quote them ("left", "right") in queries.
CREATE OR REPLACE VIEW consistency AS
SELECT query_id, "left", "right", metric, k, value
FROM read_parquet('{root}/consistency/part-*.parquet');

CREATE OR REPLACE VIEW counterfactual AS
SELECT query_id, removal, k, query_loss_full, query_loss_removed, loss_rise, relative_rise,
       removed_of_target_artist, removed_items, config_id, train_steps, full_model
FROM read_parquet('{root}/counterfactual/part-*.parquet');
