"""Bring your own corpus: a CSV or parquet manifest of real audio files drives `training_manifest` and
`training_features` unchanged; a bad row fails its shard with the fix (or is skipped and reported on request)."""

from __future__ import annotations

import shutil
from pathlib import Path

import polars as pl
import pytest
import soundfile as sf
from dagster import AssetKey, DagsterInstance

from tda_assets.io.storage import Storage
from tda_assets.data.corpus import ARTISTS, SAMPLE_RATE, render_clip, style_caption
from tda_assets.attribution.errors import AttributionInputError
from tda_assets.data.manifests import shard_of as shard_of_n
from tda_assets.defs.partitions import SHARD_KEYS
from tda_assets.defs.configs import UnlearningConfig
from tda_assets.data.inbox import add_query
from tda_assets.experiments.runner import Runner
from tda_assets.io.artifacts import read_features
from tda_assets.io.registry import entry
from tda_assets.io.tables import read_table, read_tables


def shard_of(item_id: str) -> str:
    return shard_of_n(item_id, len(SHARD_KEYS))


ITEMS = ["0012", "song-b", "song-c", "song-d", "song-e", "song-f"]  # "0012" must stay a string, not 12
BAD = "song-d"


@pytest.fixture(scope="module")
def audio_dir(tmp_path_factory) -> Path:
    """Six clips by two styles, as a user's folder of WAV files."""
    import random

    folder = tmp_path_factory.mktemp("my-corpus")
    (folder / "audio").mkdir()
    rows = []
    for i, item in enumerate(ITEMS):
        style = ARTISTS[i % 2]
        sf.write(folder / "audio" / f"{item}.wav", render_clip(style, seed=i), SAMPLE_RATE, subtype="PCM_16")
        rows.append({"item_id": item, "caption": style_caption(style, random.Random(i)), "artist": style.name})
    pl.DataFrame(rows).write_parquet(folder / "rows.parquet")
    return folder


def manifest(audio_dir: Path, uris: dict[str, str] | None = None) -> pl.DataFrame:
    """The rows with a mix of relative paths, absolute paths and file:// URIs (or the given URIs)."""
    rows = pl.read_parquet(audio_dir / "rows.parquet")
    forms = ["audio/{}.wav", f"{audio_dir}/audio/{{}}.wav", f"file://{audio_dir}/audio/{{}}.wav"]
    default = {item: forms[i % 3].format(item) for i, item in enumerate(ITEMS)}
    return rows.with_columns(audio_uri=pl.Series([(uris or {}).get(i, default[i]) for i in ITEMS])).select(
        "item_id", "audio_uri", "caption", "artist"
    )


def run_training_data(root_url: str, manifest_uri: str | None, shards=SHARD_KEYS, skip: bool = False) -> Runner:
    runner = Runner.create(DagsterInstance.ephemeral(), root_url, log=lambda _m: None)
    runner.log_level = "WARNING"
    if manifest_uri is not None:
        runner.run(
            ["training_manifest"], run_config={"ops": {"training_manifest": {"config": {"manifest_uri": manifest_uri}}}}
        )
    features_config = {"ops": {"training_features": {"config": {"skip_bad_items": skip}}}}
    for shard in shards:
        runner.run(["training_features"], shard, run_config=features_config)
    return runner


def features_files(root_dir: Path) -> dict[str, bytes]:
    root = Storage(str(root_dir))
    features = entry("training_features")
    return {f"shard={features.parse(k)['shard']}": root.read_bytes(k) for k in root.glob(features.glob())}


def encoded_items(root_url: str) -> list[str]:
    root = Storage(root_url)
    return sorted(i for k in root.glob(entry("training_features").glob()) for i in read_features(root, k)[0].item_ids)


@pytest.fixture(scope="module")
def materialized(audio_dir, tmp_path_factory) -> Path:
    """A storage root with the user's CSV manifest and the features of every shard."""
    manifest(audio_dir).write_csv(audio_dir / "manifest.csv")
    root_dir = tmp_path_factory.mktemp("storage")
    run_training_data(str(root_dir), str(audio_dir / "manifest.csv"))
    return root_dir


def test_csv_manifest_materializes_features_for_every_item(materialized, audio_dir):
    table = Storage(str(materialized)).read_parquet("training_manifest/part-0.parquet")
    assert table["item_id"].to_list() == ITEMS
    assert table["audio_uri"][0] == f"{audio_dir}/audio/0012.wav"  # relative to the manifest's folder
    assert table["audio_uri"][2] == f"file://{audio_dir}/audio/song-c.wav"
    assert table["shard"].to_list() == [shard_of(i) for i in ITEMS]
    assert encoded_items(str(materialized)) == sorted(ITEMS)


def test_parquet_manifest_from_tda_manifest_env(audio_dir, tmp_path, monkeypatch):
    uris = {i: f"file://{audio_dir}/audio/{i}.wav" for i in ITEMS}
    manifest(audio_dir, uris).write_parquet(tmp_path / "manifest.parquet")
    monkeypatch.setenv("TDA_MANIFEST", str(tmp_path / "manifest.parquet"))  # read when the asset runs
    root_dir = tmp_path / "storage"
    runner = Runner.create(DagsterInstance.ephemeral(), str(root_dir), log=lambda _m: None)
    runner.run(["training_manifest"])
    meta = runner.instance.get_latest_materialization_event(
        AssetKey("training_manifest")
    ).asset_materialization.metadata
    assert meta["origin"].value == str(tmp_path / "manifest.parquet") and meta["rows"].value == len(ITEMS)
    assert meta["items_per_artist"].value == {"artist_00": 3, "artist_01": 3}
    bad_shard = shard_of(BAD)
    run_training_data(str(root_dir), None, shards=[bad_shard])
    assert encoded_items(str(root_dir)) == sorted(i for i in ITEMS if shard_of(i) == bad_shard)


def _bad_manifest(audio_dir: Path, tmp_path: Path, kind: str) -> str:
    if kind == "corrupt":
        (tmp_path / "broken.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEthis is not audio")
        uri = str(tmp_path / "broken.wav")
    else:
        uri = str(tmp_path / "no-such-file.wav")
    path = tmp_path / f"manifest-{kind}.csv"
    manifest(audio_dir, {BAD: uri}).write_csv(path)
    return str(path)


@pytest.mark.parametrize(
    "kind, problem", [("missing", "audio file is missing"), ("corrupt", "audio cannot be decoded")]
)
def test_bad_row_fails_its_shard_naming_the_item_and_leaves_features_intact(
    materialized, audio_dir, tmp_path, kind, problem
):
    root_dir = tmp_path / "storage"
    shutil.copytree(materialized, root_dir)
    before = features_files(root_dir)
    runner = Runner.create(DagsterInstance.ephemeral(), str(root_dir), log=lambda _m: None)
    runner.run(
        ["training_manifest"],
        run_config={
            "ops": {"training_manifest": {"config": {"manifest_uri": _bad_manifest(audio_dir, tmp_path, kind)}}}
        },
    )
    with pytest.raises(
        AttributionInputError, match=rf"item {BAD}: {problem}.*shard {shard_of(BAD)}.*skip_bad_items: true"
    ):
        run_training_data(str(root_dir), None, shards=[shard_of(BAD)])
    assert features_files(root_dir) == before  # byte-identical, the failed shard's previous file included


def test_skip_bad_items_skips_and_reports_the_item(materialized, audio_dir, tmp_path):
    root_dir = tmp_path / "storage"
    shutil.copytree(materialized, root_dir)
    before = features_files(root_dir)
    runner = run_training_data(
        str(root_dir), _bad_manifest(audio_dir, tmp_path, "corrupt"), shards=[shard_of(BAD)], skip=True
    )
    record = runner.instance.get_latest_materialization_event(AssetKey("training_features"))
    assert record.asset_materialization.metadata["skipped_items"].value == [BAD]
    assert encoded_items(str(root_dir)) == sorted(i for i in ITEMS if i != BAD)
    after = features_files(root_dir)
    assert {s: b for s, b in after.items() if s != f"shard={shard_of(BAD)}"} == {
        s: b for s, b in before.items() if s != f"shard={shard_of(BAD)}"
    }


def test_a_shard_whose_items_are_all_skipped_is_empty_and_reports_them(materialized, audio_dir, tmp_path):
    root_dir = tmp_path / "storage"
    shutil.copytree(materialized, root_dir)
    shard = shard_of(BAD)
    doomed = [i for i in ITEMS if shard_of(i) == shard]
    path = tmp_path / "all-bad.csv"
    manifest(audio_dir, {i: str(tmp_path / f"gone-{i}.wav") for i in doomed}).write_csv(path)
    runner = run_training_data(str(root_dir), str(path), shards=[shard], skip=True)
    meta = runner.instance.get_latest_materialization_event(
        AssetKey("training_features")
    ).asset_materialization.metadata
    assert meta["rows"].value == 0 and meta["skipped_items"].value == doomed
    assert not (root_dir / "training_features" / f"shard={shard}" / "features.safetensors").exists()
    assert encoded_items(str(root_dir)) == sorted(i for i in ITEMS if i not in doomed)


def test_manifest_without_a_required_column_names_it(audio_dir, tmp_path):
    manifest(audio_dir).drop("artist").write_csv(tmp_path / "m.csv")
    with pytest.raises(
        ValueError, match=r"missing column\(s\) \['artist'\]; required: item_id, audio_uri, caption, artist"
    ):
        run_training_data(str(tmp_path / "storage"), str(tmp_path / "m.csv"), shards=[])


def test_missing_manifest_file_gives_the_fix(tmp_path):
    with pytest.raises(
        FileNotFoundError, match=r"manifest .*nowhere.csv not found: set manifest_uri \(or TDA_MANIFEST\)"
    ):
        run_training_data(str(tmp_path / "storage"), str(tmp_path / "nowhere.csv"), shards=[])


def test_manifest_and_audio_on_s3_with_a_local_storage_root(s3_root, audio_dir, tmp_path):
    corpus = Storage(f"{s3_root}/my-corpus")
    for item in ITEMS:
        corpus.write_bytes(f"audio/{item}.wav", (audio_dir / "audio" / f"{item}.wav").read_bytes())
    rows = manifest(audio_dir, {i: f"audio/{i}.wav" for i in ITEMS})  # relative to the manifest's s3:// folder
    rows = rows.with_columns(
        pl.when(pl.col("item_id") == "0012")
        .then(pl.lit(corpus.uri("audio/0012.wav")))
        .otherwise(pl.col("audio_uri"))
        .alias("audio_uri")
    )  # and one absolute s3:// URI
    corpus.write_bytes("manifest.csv", rows.write_csv().encode())
    root_url = str(tmp_path / "storage")
    run_training_data(root_url, corpus.uri("manifest.csv"), shards=[shard_of(BAD)])
    table = Storage(root_url).read_parquet("training_manifest/part-0.parquet")
    assert table["audio_uri"].to_list() == [corpus.uri(f"audio/{i}.wav") for i in ITEMS]
    assert encoded_items(root_url) == sorted(i for i in ITEMS if shard_of(i) == shard_of(BAD))


def test_a_skipped_item_gets_no_attribution_row_and_the_row_check_still_passes(
    materialized, audio_dir, tmp_path, monkeypatch
):
    monkeypatch.setenv("TDA_TRAIN_STEPS", "20")
    root_dir = tmp_path / "storage"
    shutil.copytree(materialized, root_dir)
    runner = run_training_data(
        str(root_dir), _bad_manifest(audio_dir, tmp_path, "corrupt"), shards=[shard_of(BAD)], skip=True
    )
    runner.run(["checkpoint"])
    runner.run(["fisher_diagonal"])
    for shard in SHARD_KEYS:
        runner.run(["baseline_losses"], shard)
        runner.run(["training_embeddings"], shard)
    add_query(Storage(str(root_dir)), "a bright plucked melody", query_id="q1")
    assert runner.requested_queries() == ["q1"]
    result = runner.attribute("q1", UnlearningConfig(lr=100.0))
    rows = {e.check_name: e for e in result.get_asset_check_evaluations()}["one_row_per_training_item"]
    assert rows.passed and rows.metadata["rows"].value == rows.metadata["training_items"].value == len(ITEMS) - 1
    scored = read_tables(Storage(str(root_dir)), "attribution_scores", query_id="q1", config_id="default")
    assert BAD not in scored["item_id"].to_list() and sorted(scored["rank"]) == list(range(1, len(ITEMS)))
    similar = read_table(Storage(str(root_dir)), "similarity_scores", query_id="q1", method="similarity:internal")
    assert sorted(similar["item_id"]) == sorted(scored["item_id"])  # the stored embeddings skip it too
