"""The embedded graph end to end with every table, weight file and the inbox on S3 (moto's standalone server).

A second run takes its checkpoint from an `s3://` model folder (the first run's embedded model, uploaded to another
prefix the way a user would: plain objects, no marker) and must reproduce the first run's baseline losses exactly.
"""

from __future__ import annotations

import tempfile
import time

import polars as pl
import pytest
from dagster import AssetKey, DagsterInstance

from tda_assets.io.query_engine import QueryEngine
from tda_assets.io.storage import Storage
from tda_assets import cli
from tda_assets.data.demo import builtin_queries
from tda_assets.defs.configs import UnlearningConfig
from tda_assets.defs.partitions import SHARD_KEYS
from tda_assets.experiments.runner import Runner
from tda_assets.io.checkpoints import read_checkpoint_record
from tda_assets.io.registry import key
from tda_assets.io.tables import read_table, read_tables
from tests.s3_server import shared_moto_endpoint, use_moto

ARTISTS, CLIPS = 2, 3
N = ARTISTS * CLIPS
MANIFEST = {"clips_per_artist": CLIPS, "artists": ARTISTS}


def usage(root: Storage) -> dict[str, int]:
    """`key → bytes` of every object under the storage root."""
    root.fs.invalidate_cache()
    found = root.fs.find(root.fs_path, detail=True)
    return {path[len(root.fs_path) + 1 :]: int(info["size"]) for path, info in found.items()}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setattr(tempfile, "tempdir", str(tmp_path_factory.mktemp("tmp")))  # local model copies land in the test's tmp
    root_url = use_moto(mp, shared_moto_endpoint(), prefix="tda")
    mp.setenv("TDA_TRAIN_STEPS", "40")
    mp.setenv("TDA_STORAGE_URL", root_url)  # for the `tda` console commands
    yield mp, root_url
    mp.undo()


@pytest.fixture(scope="module")
def s3_run(env):
    """Training side and one built-in query on S3; records what one query's run added to the bucket."""
    mp, root_url = env
    instance = DagsterInstance.ephemeral()
    runner = Runner.create(instance, root_url, log=lambda _m: None)
    start = time.perf_counter()
    runner.training_side(MANIFEST)
    root = runner.resources["storage"].root()
    builtin_queries(root, artists=1)
    (qid,) = runner.requested_queries()
    before = usage(root)
    query_start = time.perf_counter()
    runner.attribute(qid, UnlearningConfig(lr=100.0))
    query_seconds = time.perf_counter() - query_start
    after = usage(root)
    added = {k: v for k, v in after.items() if k not in before}
    size = sum(after.values()) - sum(before.values())
    print(
        f"\n[s3 run] wall time {time.perf_counter() - start:.1f}s (one query {query_seconds:.1f}s); "
        f"one query added {len(added)} objects, {size} bytes ({size / 1024:.1f} KiB); "
        f"root now {len(after)} objects, {sum(after.values())} bytes"
    )
    for name, n in sorted(added.items()):
        print(f"    + {name} ({n} B)")
    return runner, root, qid, added


@pytest.fixture(scope="module")
def external_run(env, s3_run):
    """A second storage prefix whose checkpoint source is an s3:// copy of the first run's model folder."""
    mp, root_url = env
    _, root, _, _ = s3_run
    record = read_checkpoint_record(root)
    bucket = root.bucket
    model_url = f"s3://{bucket}/models/tiny-embedded"
    models = Storage(model_url)
    files = root.listing(record.folder_key)
    for rel in files:
        if rel != "_SUCCESS":  # as `aws s3 sync` would upload it: plain objects, no marker
            models.write_bytes(rel, root.read_bytes(f"{record.folder_key}/{rel}"))
    mp.setenv("TDA_CHECKPOINT", model_url)
    runner = Runner.create(DagsterInstance.ephemeral(), f"s3://{bucket}/tda-external", log=lambda _m: None)
    mp.delenv("TDA_CHECKPOINT")
    runner.run(["training_manifest"], run_config={"ops": {"training_manifest": {"config": MANIFEST}}})
    for shard in SHARD_KEYS:
        runner.run(["training_features"], shard)
    runner.run(["checkpoint"])
    for shard in SHARD_KEYS:
        runner.run(["baseline_losses"], shard)
    return runner, runner.resources["storage"].root(), model_url


def test_every_table_and_the_corpus_live_in_the_bucket(s3_run):
    _, root, _, _ = s3_run
    assert root.protocol == "s3" and root.local_path("x") is None
    tops = {key.split("/", 1)[0] for key in root.listing()}
    assert tops >= {
        "corpus",
        "training_manifest",
        "training_features",
        "checkpoint",
        "fisher_diagonal",
        "baseline_losses",
        "inbox",
        "queries",
        "query_clips",
        "unlearning_configs",
        "unlearned_model",
        "unlearning_runs",
        "unlearned_losses",
        "attribution_scores",
        "similarity_scores",
        "training_embeddings",
    }
    manifest = read_table(root, "training_manifest")
    assert manifest["audio_uri"].str.starts_with(root.uri("corpus/")).all()  # the corpus clips live in the bucket too


def test_query_engine_over_s3_counts_every_table(s3_run):
    _, root, _, _ = s3_run
    counts = QueryEngine(root).table_counts()
    assert counts["training_items"] == N
    assert counts["baseline_losses"] == N * 16
    assert counts["queries"] == 1 and counts["unlearning_runs"] == 1
    assert counts["attributions"] == N * 5  # unlearning + 4 similarity methods (audio, text, internal, latent)


def test_query_engine_over_s3_ranks_every_item_once(s3_run):
    _, root, qid, _ = s3_run
    df = QueryEngine(root).sql(
        "select query_id, count(*) n, min(rank) lo, max(rank) hi, count(distinct item_id) items from attributions "
        "where method = 'unlearning' group by query_id"
    )
    assert df.rows() == [(qid, N, 1, N, N)]
    runs = QueryEngine(root).sql("select query_loss_before, query_loss_after from unlearning_runs")
    assert runs["query_loss_after"][0] > runs["query_loss_before"][0]


def test_tda_sql_console_reads_the_s3_tables(s3_run, capsys):
    _, root, qid, _ = s3_run
    expected = QueryEngine(root).sql("select item_id, artist from training_items order by item_id")
    assert cli.main(["sql", "select item_id, artist from training_items order by item_id"]) == 0
    out = capsys.readouterr().out
    for item_id, artist in expected.rows():
        assert item_id in out and artist in out
    assert cli.main(["sql", "select count(*) as n_rows from attributions where method = 'unlearning'"]) == 0
    out = capsys.readouterr().out
    assert "n_rows" in out and f"│ {N}" in out


def test_tda_query_console_runs_a_named_query_on_s3(s3_run, capsys):
    _, _, qid, _ = s3_run
    assert cli.main(["query", "top_k", "-p", "k=2"]) == 0
    out = capsys.readouterr().out
    assert qid in out and "artist_0" in out


def test_one_query_adds_only_its_own_partitions(s3_run):
    runner, root, qid, added = s3_run
    params = runner.instance.get_latest_materialization_event(AssetKey("checkpoint")).asset_materialization.metadata
    record = read_checkpoint_record(root)
    delta = added[
        key(
            "unlearned_delta",
            checkpoint_id=record.checkpoint_id,
            protocol_id="s0-k16",
            query_id=qid,
            config_id="default",
        )
    ]
    assert 2 * params["parameters"].value <= delta < 4 * params["parameters"].value + 100_000  # fp32, most parameters
    assert len(added) == 14 and sum(added.values()) - delta < 1_000_000  # everything else is small
    shared = [k for k in added if f"query_id={qid}" not in k and f"/{qid}/" not in k]
    assert all(k.startswith("unlearning_configs/config_id=default/") for k in shared), shared
    record = runner.instance.get_latest_materialization_event(AssetKey("attribution_scores"))
    assert record is not None and record.asset_materialization.metadata["rows"].value == N


def test_s3_folder_checkpoint_is_recorded_as_external(external_run):
    runner, root, model_url = external_run
    record = read_checkpoint_record(root)
    assert record.kind == "external" and record.source == model_url and record.checkpoint_id.startswith("s3-")
    assert record.encoder_id == record.checkpoint_id  # an external model's features come from its own encoders
    meta = runner.instance.get_latest_materialization_event(AssetKey("checkpoint")).asset_materialization.metadata
    assert meta["kind"].value == "external" and meta["source"].value == model_url
    assert not root.glob("checkpoint/*/transformer/*")  # no copy of the weights under the second root


def test_s3_folder_checkpoint_gives_the_same_baseline_losses(s3_run, external_run):
    _, first, _, _ = s3_run
    _, second, _ = external_run
    cols = ["item_id", "draw", "t", "loss"]
    a = read_tables(first, "baseline_losses").select(cols).sort("item_id", "draw")
    b = read_tables(second, "baseline_losses").select(cols).sort("item_id", "draw")
    assert a.height == N * 16
    assert a.equals(b)
    assert read_checkpoint_record(first).checkpoint_id != read_checkpoint_record(second).checkpoint_id


def test_an_empty_shard_is_an_empty_table_not_a_failure(s3_run):
    _, root, _, _ = s3_run
    shards = read_table(root, "training_manifest")["shard"].unique().to_list()
    empty = sorted(set(SHARD_KEYS) - set(shards))
    assert empty  # 6 items over 4 shards leave one empty (hash of the ids)
    record = read_checkpoint_record(root)
    for shard in empty:
        assert not root.exists(key("training_features", encoder_id=record.encoder_id, shard=shard))
        assert (
            read_table(
                root, "baseline_losses", checkpoint_id=record.checkpoint_id, protocol_id="s0-k16", shard=shard
            ).height
            == 0
        )
    assert pl.Series(shards).n_unique() == len(SHARD_KEYS) - len(empty)
