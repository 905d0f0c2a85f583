"""One rule judges an inbox query wherever it is read (the sensor, `tda run-inbox`, `tda queries`), with the allowed
roots of the root itself (the manifest it was prepared from); `add_clip_query` refuses a bad clip before the inbox."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf

from tda_assets.data.inbox import QueryFileError, add_clip_query, allowed_audio_roots, judge_query
from tda_assets.data.manifests import record_manifest_origin
from tda_assets.experiments.query_listing import query_table
from tda_assets.io.registry import key
from tda_assets.io.storage import Storage


@pytest.fixture
def root(tmp_path) -> Storage:
    return Storage(str(tmp_path / "storage"))


def clip(path, seconds: float = 1.0) -> str:
    t = np.arange(int(16000 * seconds)) / 16000
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), 16000)
    return str(path)


def drop(root: Storage, qid: str, body: dict) -> str:
    """A query file written by hand into the inbox; its key."""
    path = key("inbox", name=f"{qid}.json")
    root.write_bytes(path, json.dumps(body).encode())
    return path


def test_the_folder_of_the_manifest_the_root_was_prepared_from_is_an_allowed_root(root, tmp_path):
    record_manifest_origin(root, str(tmp_path / "corpus" / "manifest.csv"))
    assert allowed_audio_roots(root, ["s3://clips/uploads"]) == [
        root.uri(""),
        str(tmp_path / "corpus"),
        "s3://clips/uploads",
    ]


def test_the_embedded_corpus_records_no_manifest_folder(root):
    record_manifest_origin(root, None)
    assert allowed_audio_roots(root) == [root.uri("")]


def test_a_query_whose_clip_is_missing_is_invalid_until_its_clip_is_in_the_root(root, tmp_path):
    record_manifest_origin(root, str(tmp_path / "corpus" / "manifest.csv"))
    path = drop(root, "gone", {"prompt": "a flute", "audio_uri": str(tmp_path / "corpus" / "clips" / "gone.wav")})
    with pytest.raises(
        QueryFileError,
        match=r"its clip .*gone\.wav does not exist; put the clip there, or add the "
        r"query again with `tda add-query --audio FILE`",
    ):
        judge_query(root, path, allowed_audio_roots(root))
    root.write_bytes(key("query_features", query_id="gone"), b"features")  # its clip run already read the clip
    assert judge_query(root, path, allowed_audio_roots(root)).query_id == "gone"


def test_the_query_table_judges_with_the_allowed_roots_it_is_given(root, tmp_path):
    audio = clip(tmp_path / "shared" / "a.wav")
    drop(root, "shared-clip", {"prompt": "a tune", "audio_uri": audio})
    assert query_table(root, "s0-k16")["state"].to_list() == ["invalid"]
    table = query_table(root, "s0-k16", roots=allowed_audio_roots(root, [str(tmp_path / "shared")]))
    assert table.select("state", "prompt").row(0) == ("waiting", "a tune")


def test_a_local_clip_is_copied_into_the_root(root, tmp_path):
    audio = clip(tmp_path / "mine" / "Cello Take.WAV")
    spec = add_clip_query(root, audio)
    assert (spec.query_id, spec.prompt) == ("cello-take", "music")
    assert spec.audio_uri == root.uri("uploads/cello-take.wav")
    assert json.loads(root.read_bytes(key("inbox", name="cello-take.json")))["audio_uri"] == spec.audio_uri


@pytest.mark.parametrize(
    "make, says",
    [
        (lambda d: str(d / "nowhere.wav"), r"audio file .*nowhere\.wav does not exist: give a path"),
        (
            lambda d: (d / "bad.wav").write_bytes(b"RIFF junk") and str(d / "bad.wav"),
            r"cannot be decoded .*re-export it",
        ),
        (lambda d: clip(d / "short.wav", 0.1), r"only 100 ms long"),
        (lambda d: f"file://{clip(d / 'elsewhere.wav')}", r"outside the allowed roots; .*TDA_ALLOWED_AUDIO_ROOTS"),
    ],
    ids=["missing", "corrupt", "too-short", "outside-roots"],
)
def test_a_bad_clip_is_refused_before_anything_is_written(root, tmp_path, make, says):
    audio = make(tmp_path)
    with pytest.raises((ValueError, FileNotFoundError), match=says):
        add_clip_query(root, audio, "a tune", "q1", roots=allowed_audio_roots(root))
    assert not root.glob("inbox/*") and not root.glob("uploads/*")


def test_add_query_with_a_clip_imports_neither_torch_nor_the_definitions(tmp_path):
    code = (
        "import json, sys\nfrom tda_assets.cli import main\nrc = main(sys.argv[1:])\n"
        "print(json.dumps([m for m in ('torch', 'diffusers', 'tda_assets.definitions') if m in sys.modules]))\n"
        "sys.exit(rc)"
    )
    env = {**os.environ, "TDA_STORAGE_URL": str(tmp_path / "storage"), "DAGSTER_HOME": str(tmp_path / "home")}
    argv = ["add-query", "a tune", "--audio", clip(tmp_path / "a.wav")]
    done = subprocess.run(
        [sys.executable, "-c", code, *argv], env=env, capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []
    assert "with its clip " + str(tmp_path / "storage" / "uploads" / "a-tune.wav") in done.stdout


def test_a_sensor_tick_fills_its_runs_with_valid_queries_past_the_invalid_ones(root, tmp_path, caplog):
    from dagster import DagsterInstance, build_sensor_context

    from resources import InboxResource, LossProtocolResource, StorageResource
    from tda_assets.defs.sensors import query_inbox_sensor
    from tda_assets.io.checkpoints import CheckpointRecord, write_checkpoint_record

    write_checkpoint_record(root, CheckpointRecord("ckpt", "external", "a folder", "enc"))
    drop(root, "a-gone", {"prompt": "a flute", "audio_uri": str(tmp_path / "gone.wav")})
    drop(root, "b-outside", {"prompt": "a harp", "audio_uri": "/srv/elsewhere/harp.wav"})
    for i in range(12):
        drop(root, f"q-{i:02d}", {"prompt": f"tune {i}"})
    with DagsterInstance.ephemeral() as instance:
        context = build_sensor_context(
            instance=instance,
            resources={
                "storage": StorageResource(url=root.url),
                "inbox": InboxResource(allowed_audio_roots=[str(tmp_path)]),
                "protocol": LossProtocolResource(),
            },
        )
        context.log.addHandler(caplog.handler)  # the sensor's own logger (it does not propagate to the root logger)
        result = query_inbox_sensor(context)
    assert [r.partition_key for r in result.run_requests] == [f"q-{i:02d}" for i in range(10)]
    skipped = [r.getMessage() for r in caplog.records if "inbox file skipped" in r.getMessage()]
    assert len(skipped) == 2 and "gone.wav does not exist" in skipped[0] and "outside the allowed roots" in skipped[1]
