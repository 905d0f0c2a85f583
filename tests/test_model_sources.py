"""Checkpoint sources: a Hugging Face hub snapshot (offline, on a hub cache this test lays out like the hub does),
local folders of the right and the wrong kind, and s3:// folders that do not exist."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
from dagster import AssetKey, DagsterInstance, EnvVar, materialize

from resources import ComputeResource, ModelSourceResource, StorageResource
from tda_assets.models.sources import resolve_folder, resolve_hf, resolve_source
from tda_assets.io.storage import Storage
from tda_assets.models.embedded.model import EmbeddedAdapter
from tda_assets.attribution.errors import ModelSourceError
from tda_assets.models.model_folder import load_model, save_model
from tda_assets.defs.assets.model import checkpoint
from tda_assets.models.sources import ModelSource
from tda_assets.io.checkpoints import CheckpointRecord, local_model_folder, read_checkpoint_record

REPO = "tda-test/tiny-embedded"
COMMIT = hashlib.sha1(b"tiny-embedded v1").hexdigest()
COMMIT_2 = hashlib.sha1(b"tiny-embedded v2").hexdigest()


def lay_out_snapshot(cache: Path, repo: str, commit: str, files: Path, refs: tuple[str, ...] = ("main",)) -> Path:
    """Put `files` into a hub cache as `snapshot_download` leaves it: blobs by hash, snapshot symlinks, refs, tree."""
    repo_dir = cache / f"models--{repo.replace('/', '--')}"
    snapshot = repo_dir / "snapshots" / commit
    tree = {}
    for f in sorted(p for p in files.rglob("*") if p.is_file()):
        data = f.read_bytes()
        blob = hashlib.sha256(data).hexdigest()
        (repo_dir / "blobs").mkdir(parents=True, exist_ok=True)
        (repo_dir / "blobs" / blob).write_bytes(data)
        rel = f.relative_to(files).as_posix()
        link = snapshot / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(repo_dir / "blobs" / blob, link.parent))
        tree[rel] = {
            "size": len(data),
            "blob_id": hashlib.sha1(data).hexdigest(),
            "lfs_sha256": blob,
            "lfs_size": len(data),
        }
    for ref in refs:
        (repo_dir / "refs" / ref).parent.mkdir(parents=True, exist_ok=True)
        (repo_dir / "refs" / ref).write_text(commit)
    (repo_dir / "trees").mkdir(parents=True, exist_ok=True)
    (repo_dir / "trees" / f"{commit}.json").write_text(json.dumps({"format_version": 1, "files": tree}))
    return snapshot


@pytest.fixture(scope="module")
def model_files(tmp_path_factory) -> Path:
    """A tiny embedded model folder in the diffusers save_pretrained layout (random weights)."""
    folder = tmp_path_factory.mktemp("model")
    save_model(EmbeddedAdapter.new(seed=0, layers=1), folder)
    return folder


@pytest.fixture
def hub(tmp_path, model_files, monkeypatch) -> Path:
    """A hub cache holding REPO at COMMIT (refs main and v1); the hub is offline."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cache = tmp_path / "hf" / "hub"
    lay_out_snapshot(cache, REPO, COMMIT, model_files, refs=("main", "v1"))
    return cache


def test_hub_tag_resolves_offline_and_pins_the_commit(hub):
    resolved = resolve_hf(f"hf://{REPO}@v1", cache_dir=str(hub), offline=True)
    assert resolved.revision == COMMIT
    assert resolved.folder == hub / f"models--{REPO.replace('/', '--')}" / "snapshots" / COMMIT
    assert resolved.checkpoint_id == f"hf-tda-test-tiny-embedded-{COMMIT[:12]}"
    assert isinstance(load_model(resolved.folder), EmbeddedAdapter)


def test_hub_commit_sha_resolves_offline(hub):
    assert resolve_hf(f"hf://{REPO}@{COMMIT}", cache_dir=str(hub), offline=True).revision == COMMIT


def test_hub_cache_and_offline_mode_are_read_from_the_environment_when_resolving(hub, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(hub.parent))  # read when the resource gives its source, not at import
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    source = ModelSourceResource(source=f"hf://{REPO}@main").model_source()
    assert source.hub_cache == str(hub) and source.offline
    assert source.resolve().revision == COMMIT


def test_unknown_hub_repo_names_the_repo(hub):
    with pytest.raises(
        ModelSourceError, match=r"repository tda-test/no-such-model is not in the hub cache .*HF_HUB_OFFLINE=1"
    ):
        resolve_hf("hf://tda-test/no-such-model@main", cache_dir=str(hub), offline=True)


def test_unknown_hub_revision_names_it_and_lists_the_cached_ones(hub):
    with pytest.raises(
        ModelSourceError, match=rf"revision 'v9' of {REPO} is not in the hub cache .*cached: main, v1, {COMMIT}"
    ):
        resolve_hf(f"hf://{REPO}@v9", cache_dir=str(hub), offline=True)


def test_hub_source_without_revision_gives_the_fix(hub):
    with pytest.raises(ModelSourceError, match=rf"has no revision: pin one, e.g. hf://{REPO}@<commit sha or tag>"):
        resolve_hf(f"hf://{REPO}", cache_dir=str(hub), offline=True)


def test_malformed_hub_source_gives_the_form(hub):
    with pytest.raises(ModelSourceError, match=r"write a hub checkpoint as hf://<org>/<name>@<revision>"):
        resolve_source("hf://just-a-name@main")


def test_incomplete_hub_snapshot_says_so(hub):
    snapshot = hub / f"models--{REPO.replace('/', '--')}" / "snapshots" / COMMIT
    (snapshot / "tda_model.json").unlink()
    with pytest.raises(ModelSourceError, match=rf"cached snapshot of {REPO}@main is incomplete"):
        resolve_hf(f"hf://{REPO}@main", cache_dir=str(hub), offline=True)


def test_hub_repo_of_the_wrong_kind_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    files = tmp_path / "files"
    files.mkdir()
    (files / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    lay_out_snapshot(tmp_path / "hub", "org/sd", COMMIT, files)
    with pytest.raises(ModelSourceError, match="holds a diffusers StableDiffusionPipeline, not a text-to-music model"):
        resolve_hf("hf://org/sd@main", cache_dir=str(tmp_path / "hub"), offline=True)


def test_local_folder_resolves(model_files):
    for source in (str(model_files), f"file://{model_files}"):
        resolved = resolve_folder(source)
        assert (
            resolved.folder == model_files and resolved.checkpoint_id.startswith("local-") and resolved.revision is None
        )


def test_local_folder_of_another_pipeline_is_refused(tmp_path):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    with pytest.raises(
        ModelSourceError,
        match=rf"model folder {tmp_path} holds a diffusers StableDiffusionPipeline.*StableAudioPipeline",
    ):
        resolve_folder(str(tmp_path))


def test_empty_local_folder_is_refused(tmp_path):
    with pytest.raises(ModelSourceError, match=rf"{tmp_path} is not a model folder: .*save_pretrained layout"):
        resolve_source(str(tmp_path))


def test_missing_local_folder_is_refused(tmp_path):
    with pytest.raises(
        ModelSourceError, match=r"folder not found; give a diffusers model folder, s3://…, hf://…@rev or 'embedded'"
    ):
        resolve_source(str(tmp_path / "nowhere"))


def test_missing_s3_folder_is_refused(s3_root):
    with pytest.raises(ModelSourceError, match=rf"checkpoint '{s3_root}/models/none': no such folder on S3"):
        resolve_source(f"{s3_root}/models/none")


def test_s3_folder_in_a_missing_bucket_names_the_bucket(s3_root):
    with pytest.raises(ModelSourceError, match=r"the bucket 'no-such-bucket' does not exist .*create it"):
        resolve_source("s3://no-such-bucket/models/tiny")


def test_s3_folder_resolves_to_a_local_copy(s3_root, model_files, tmp_path):
    url = f"{s3_root}/models/tiny"
    models = Storage(url)
    for f in sorted(p for p in model_files.rglob("*") if p.is_file()):
        models.write_bytes(f.relative_to(model_files).as_posix(), f.read_bytes())
    resolved = resolve_source(url, copies_dir=str(tmp_path))
    assert resolved.checkpoint_id.startswith("s3-") and resolved.folder.is_relative_to(tmp_path)
    assert (resolved.folder / "transformer" / "config.json").read_bytes() == (
        model_files / "transformer" / "config.json"
    ).read_bytes()
    assert resolve_source(url, copies_dir=str(tmp_path)).checkpoint_id == resolved.checkpoint_id
    models.write_bytes("tda_model.json", (model_files / "tda_model.json").read_bytes() + b"\n")  # a re-upload
    assert resolve_source(url, copies_dir=str(tmp_path)).checkpoint_id != resolved.checkpoint_id


def test_hf_token_comes_from_the_environment_as_an_envvar(monkeypatch):
    from resources import Env, build_resources

    monkeypatch.setenv("HF_TOKEN", "hf_not_a_real_token")
    monkeypatch.setenv("TDA_CHECKPOINT", f"hf://{REPO}@v1")
    source = build_resources(Env.read())["model_source"]
    assert source.hf_token == EnvVar("HF_TOKEN") and source.source == f"hf://{REPO}@v1"


def test_checkpoint_asset_records_the_pinned_hub_revision(hub, tmp_path, monkeypatch):
    store_url = str(tmp_path / "storage")
    monkeypatch.setenv("HF_TOKEN", "hf_not_a_real_token")  # resolved by Dagster at run time; unused offline
    source = ModelSourceResource(
        source=f"hf://{REPO}@main", hf_token=EnvVar("HF_TOKEN"), cache_dir=str(hub), offline=True
    )
    instance = DagsterInstance.ephemeral()
    result = materialize(
        [checkpoint],
        instance=instance,
        resources={
            "storage": StorageResource(url=store_url),
            "model_source": source,
            "compute": ComputeResource(device="cpu"),
        },
    )
    assert result.success
    meta = instance.get_latest_materialization_event(AssetKey("checkpoint")).asset_materialization.metadata
    assert meta["kind"].value == "external" and meta["source"].value == f"hf://{REPO}@main"
    assert meta["revision"].value == COMMIT and meta["checkpoint_id"].value.endswith(COMMIT[:12])
    record = read_checkpoint_record(Storage(store_url))
    assert record.revision == COMMIT

    # `main` moves on in the cache: later steps still load the recorded commit
    lay_out_snapshot(hub, REPO, COMMIT_2, Path(meta["local_folder"].value), refs=("main",))
    assert resolve_hf(f"hf://{REPO}@main", cache_dir=str(hub), offline=True).revision == COMMIT_2
    folder = local_model_folder(Storage(store_url), record, ModelSource(hub_cache=str(hub), offline=True))
    assert folder.name == COMMIT


def test_a_checkpoint_on_an_s3_storage_root_is_copied_into_the_model_cache(s3_root, model_files, tmp_path, monkeypatch):
    from resources import Env, build_resources

    monkeypatch.setenv("TDA_MODEL_CACHE", str(tmp_path / "models"))
    source = build_resources(Env.read().with_storage(s3_root))["model_source"]
    assert source.cache_dir == str(tmp_path / "models")
    root = Storage(s3_root)
    root.put_dir(model_files, "checkpoint/abc")
    record = CheckpointRecord("abc", "embedded", "embedded", encoder_id="enc", folder_key="checkpoint/abc")
    folder = local_model_folder(root, record, source.model_source())
    assert folder.parent == tmp_path / "models" / "tda-models"
    assert (folder / "tda_model.json").read_bytes() == (model_files / "tda_model.json").read_bytes()
