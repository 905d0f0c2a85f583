"""Hostile inputs: each bad inbox file or manifest gets a clear error (or a logged skip) naming the file and the reason,
and nothing already materialized is lost."""

from __future__ import annotations

import json
import logging
import os

import pytest
from dagster import DagsterInstance, build_sensor_context

from resources import Env, InboxResource, LossProtocolResource, StorageResource, build_resources
from tda_assets.data.inbox import MAX_PROMPT_CHARS, QueryFileError, add_query, read_query, read_query_file
from tda_assets.data.manifests import read_user_manifest
from tda_assets.defs.sensors import query_inbox_sensor
from tda_assets.io.registry import key
from tda_assets.io.storage import Storage
from tests.faults.conftest import runner_on, snapshot

MB_PROMPT = "la " * 350_000  # about 1 MB


def drop(root: Storage, name: str, body: bytes | str | dict) -> str:
    """Write an inbox file as a user (or an attacker) would; returns its key."""
    data = json.dumps(body).encode() if isinstance(body, dict) else body.encode() if isinstance(body, str) else body
    path = key("inbox", name=name)
    root.write_bytes(path, data)
    return path


@pytest.fixture
def root(tmp_path) -> Storage:
    return Storage(str(tmp_path / "storage"))


@pytest.mark.parametrize(
    "name, body, reason",
    [
        ("bad-json.json", '{"prompt": "a cello line",', r"is not valid JSON \(Expecting"),
        ("a-list.json", '["a cello line"]', r"holds a JSON list, not an object"),
        (
            "unknown.json",
            {"prompt": "a cello line", "promt": "typo"},
            r"unknown field\(s\) \['promt'\]; known: prompt, seed",
        ),
        ("seed-text.json", {"prompt": "a cello line", "seed": "7"}, r"seed must be an integer, not \"7\""),
        ("seed-bool.json", {"prompt": "a cello line", "seed": True}, r"seed must be an integer, not true"),
        ("prompt-list.json", {"prompt": ["a", "b"]}, r"prompt must be a string"),
        ("negative-seed.json", {"prompt": "a cello line", "seed": -1}, r"seed -1 is out of range"),
        ("empty.txt", "   \n", r"the prompt is empty"),
        ("megabyte.json", {"prompt": MB_PROMPT}, r"is 1,050,0\d\d bytes; a query file is at most 65,536 bytes"),
        ("megabyte.txt", MB_PROMPT, r"is 1,050,000 bytes; a query file is at most 65,536 bytes"),
        ("long.txt", "x" * (MAX_PROMPT_CHARS + 1), r"the prompt is 2,001 characters; at most 2,000"),
        ("latin1.txt", "caf\xe9 melody".encode("latin-1"), r"is not UTF-8 text \(byte 0xe9 at offset 3\)"),
        ("Bad Name.json", {"prompt": "a cello line"}, r"query id 'Bad Name' is not a safe slug.*rename the file"),
    ],
)
def test_a_bad_inbox_file_is_refused_naming_the_file_and_the_reason(root, name, body, reason):
    path = drop(root, name, body)
    with pytest.raises(QueryFileError, match=reason) as err:
        read_query_file(root, path)
    assert str(err.value).startswith(f"query file {root.uri(path)}")


def test_a_good_inbox_file_parses_with_its_types(root):
    path = drop(root, "ok.json", {"prompt": " a cello line ", "seed": 7, "target_artist": None})
    spec = read_query_file(root, path)
    assert (spec.query_id, spec.prompt, spec.seed, spec.audio_uri, spec.target_artist) == (
        "ok",
        "a cello line",
        7,
        None,
        None,
    )
    assert read_query_file(root, drop(root, "max.txt", "x" * MAX_PROMPT_CHARS)).prompt == "x" * MAX_PROMPT_CHARS


@pytest.mark.parametrize("query_id", ["../etc", "..", "a/../../b", "q/../x"])
def test_dot_dot_in_a_query_id_is_refused_before_any_file_is_read(root, query_id):
    with pytest.raises(ValueError, match="is not a safe slug"):
        read_query(root, query_id)
    with pytest.raises(ValueError, match="is not a safe slug"):
        add_query(root, "a cello line", query_id=query_id)
    assert not root.exists("inbox")


def outside_uris(root: Storage, tmp_path) -> list[str]:
    """Clips a query must not read: elsewhere on disk, escaping the root by '..' or a symlink, other schemes and
    buckets."""
    (tmp_path / "elsewhere").mkdir()
    secret = tmp_path / "elsewhere" / "secret.wav"
    secret.write_bytes(b"RIFF")
    link = root.uri("uploads/link.wav")
    os.makedirs(os.path.dirname(link))
    os.symlink(secret, link)
    return [
        "/etc/passwd",
        f"file://{secret}",
        f"{root.uri('uploads')}/../../elsewhere/secret.wav",
        link,
        "../elsewhere/secret.wav",
        "http://169.254.169.254/latest/meta-data",
        "s3://someone-elses-bucket/clip.wav",
    ]


def test_an_audio_uri_outside_the_allowed_roots_is_refused(root, tmp_path):
    for uri in outside_uris(root, tmp_path):
        path = drop(root, "clip.json", {"prompt": "a cello line", "audio_uri": uri})
        with pytest.raises(
            QueryFileError,
            match=r"audio_uri .*(outside the allowed roots|relative path|only local paths)"
            r".*TDA_ALLOWED_AUDIO_ROOTS \(allowed now: ",
        ) as err:
            read_query_file(root, path, ["/data/clips", "s3://clips-bucket/uploads"])
        assert root.uri(path) in str(err.value), uri


def test_an_audio_uri_under_the_root_the_manifest_folder_or_a_configured_prefix_is_accepted(
    root, tmp_path, monkeypatch
):
    monkeypatch.setenv("TDA_ALLOWED_AUDIO_ROOTS", f"{tmp_path}/shared/clips, s3://clips-bucket/uploads")
    monkeypatch.setenv("TDA_MANIFEST", f"{tmp_path}/corpus/manifest.csv")
    inbox = build_resources(Env.read().with_storage(root.url))["inbox"]
    assert inbox.audio_roots() == [f"{tmp_path}/corpus", f"{tmp_path}/shared/clips", "s3://clips-bucket/uploads"]
    for uri in [
        root.uri("uploads/q.wav"),
        f"file://{tmp_path}/corpus/audio/a.wav",
        f"{tmp_path}/shared/clips/b.wav",
        "s3://clips-bucket/uploads/c.wav",
    ]:
        path = drop(root, "clip.json", {"prompt": "a cello line", "audio_uri": uri})
        assert read_query_file(root, path, inbox.audio_roots()).audio_uri == uri
    path = drop(root, "clip.json", {"prompt": "a cello line", "audio_uri": f"{tmp_path}/shared/clips-other/b.wav"})
    with pytest.raises(QueryFileError, match="outside the allowed roots"):  # a sibling sharing the prefix's letters
        read_query_file(root, path, inbox.audio_roots())


@pytest.mark.parametrize("prefix", ["clips", "http://example.com/clips"])
def test_a_configured_audio_root_that_is_not_an_absolute_folder_or_s3_prefix_is_refused(prefix, monkeypatch, tmp_path):
    monkeypatch.setenv("TDA_ALLOWED_AUDIO_ROOTS", prefix)
    inbox = build_resources(Env.read().with_storage(str(tmp_path)))["inbox"]
    with pytest.raises(
        ValueError, match=rf"TDA_ALLOWED_AUDIO_ROOTS: '{prefix}'.*; list absolute folders or s3:// prefixes"
    ):
        inbox.audio_roots()


def test_the_sensor_logs_and_skips_bad_inbox_files_and_requests_the_others(reference, tmp_path, caplog):
    root = Storage(str(reference.copy(tmp_path / "storage")))  # a prepared root: its own query is done, not pending
    add_query(root, "a cello line", query_id="good-1")
    add_query(root, "a flute line", query_id="good-2")
    bad = {
        "bad-json.json": '{"prompt": ',
        "huge.txt": MB_PROMPT,
        "Not A Slug.txt": "a cello line",
        "outside.json": {"prompt": "a cello line", "audio_uri": "/etc/passwd"},
    }
    for name, body in bad.items():
        drop(root, name, body)
    instance = DagsterInstance.ephemeral()
    context = build_sensor_context(
        instance=instance,
        resources={
            "storage": StorageResource(url=root.url),
            "inbox": InboxResource(max_queries_per_tick=10),
            "protocol": LossProtocolResource(),
        },
    )
    context.log.addHandler(caplog.handler)  # the sensor's own logger (it does not propagate to the root logger)
    result = query_inbox_sensor(context)
    assert [r.partition_key for r in result.run_requests] == ["good-1", "good-2"]
    assert list(result.dynamic_partitions_requests[0].partition_keys) == ["good-1", "good-2"]
    skips = [
        r.getMessage()
        for r in caplog.records
        if r.levelno == logging.WARNING and "inbox file skipped" in r.getMessage()
    ]
    assert len(skips) == len(bad)
    for name, reason in [
        ("bad-json.json", "is not valid JSON"),
        ("huge.txt", "a query file is at most"),
        ("Not A Slug.txt", "is not a safe slug"),
        ("outside.json", "outside the allowed roots"),
    ]:
        assert any(root.uri(key("inbox", name=name)) in s and reason in s for s in skips), (name, skips)


def test_a_hostile_inbox_file_of_a_materialized_query_fails_its_run_and_loses_nothing(reference, tmp_path, monkeypatch):
    root_dir = reference.copy(tmp_path / "storage")
    runner = runner_on(str(root_dir), monkeypatch)
    runner.instance.add_dynamic_partitions("queries", [reference.query_id])
    inbox_file = key("inbox", name=f"{reference.query_id}.json")
    (root_dir / inbox_file).write_text(json.dumps({"prompt": "a cello line", "audio_uri": "/etc/passwd"}))
    before = snapshot(root_dir)
    with pytest.raises(
        Exception, match=rf"query file {root_dir}/{inbox_file}: audio_uri '/etc/passwd' is outside the allowed roots"
    ):
        runner.run(["query_clips"], reference.query_id)
    assert snapshot(root_dir) == before


def write_manifest(folder, name: str, text: bytes) -> str:
    folder.mkdir(exist_ok=True)
    (folder / name).write_bytes(text)
    return str(folder / name)


HEADER = b"item_id,audio_uri,caption,artist\n"


@pytest.mark.parametrize(
    "text, reason",
    [
        (
            HEADER + b"t1,a.wav,a cello line,x\nt2,b.wav,a flute line,y\nt1,c.wav,a harp line,z\n",
            r"duplicate item_id\(s\) \['t1'\]; give every row a unique item_id",
        ),
        (
            b"item_id,audio_uri,caption\nt1,a.wav,a cello line\n",
            r"missing column\(s\) \['artist'\]; required: item_id, audio_uri",
        ),
        (
            HEADER + b"t1,a.wav,a cello line,x\nt2,b.wav,caf\xe9 melody,y\n",
            r"is not UTF-8 text: byte 0xe9 on line 3; save it as UTF-8 \(e.g. `iconv",
        ),
    ],
)
def test_a_bad_manifest_is_refused_naming_the_file_and_the_reason(tmp_path, text, reason):
    path = write_manifest(tmp_path / "corpus", "manifest.csv", text)
    with pytest.raises(ValueError, match=rf"^manifest {path}:? {reason}"):
        read_user_manifest(path)


def test_a_utf8_manifest_with_a_byte_order_mark_reads(tmp_path):
    path = write_manifest(
        tmp_path / "corpus", "manifest.csv", b"\xef\xbb\xbf" + HEADER + "t1,a.wav,café melody,x\n".encode()
    )
    df = read_user_manifest(path)
    assert df.select("item_id", "caption").rows() == [("t1", "café melody")]


def test_a_bad_manifest_fails_its_run_and_the_materialized_manifest_stays(reference, tmp_path, monkeypatch):
    root_dir = reference.copy(tmp_path / "storage")
    runner = runner_on(str(root_dir), monkeypatch)
    path = write_manifest(tmp_path / "corpus", "manifest.csv", HEADER + b"t1,a.wav,caf\xe9,x\n")
    before = snapshot(root_dir)
    with pytest.raises(Exception, match=rf"manifest {path} is not UTF-8 text"):
        runner.run(["training_manifest"], run_config={"ops": {"training_manifest": {"config": {"manifest_uri": path}}}})
    assert snapshot(root_dir) == before
