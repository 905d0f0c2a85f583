"""The inbox as a user fills it, through the CLI: a root prepared from a manifest (`tda prepare --manifest`), a few
dozen queries added with `tda add-query --audio` from a folder beside the manifest (local files, copied into the root,
and file:// URIs, allowed because the root was prepared from that folder), some invalid on purpose (refused at once
when added, or dropped into the inbox by hand), drained to the end by `tda run-inbox`; `tda queries` names what is
invalid."""

from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pytest
import soundfile as sf

from tda_assets.cli import main
from tda_assets.io.storage import Storage
from tda_assets.io.tables import read_tables
from tests.test_own_corpus import RATE, recording

ARTISTS, PER_ARTIST, LOCAL, URIS = 2, 3, 20, 4
DROPPED = {  # inbox files a user wrote by hand: query id → (file body, what `tda queries` and `tda run-inbox` say)
    "bad-json": ("{'prompt': 'single quotes'", "is not valid JSON"),
    "outside": ({"prompt": "a cello", "audio_uri": "/srv/elsewhere/cello.wav"}, "is outside the allowed roots"),
    "gone": ({"prompt": "a flute", "audio_uri": "{clips}/gone.wav"}, "does not exist"),
    "no-prompt": ({"prompt": "  ", "audio_uri": "{clips}/q-00.wav"}, "the prompt is empty"),
}


def run(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(argv))
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def drained_inbox(tmp_path_factory):
    """The user's folder (manifest, recordings, clips/), the root prepared from it, the queries added and drained."""
    mp = pytest.MonkeyPatch()
    data, root_dir, home, other = (tmp_path_factory.mktemp(n) for n in ("data", "storage", "home", "other"))
    rng = np.random.default_rng(3)
    rows = []
    for a in range(ARTISTS):
        for take in range(PER_ARTIST):
            item = f"rec-a{a}-{take:02d}"
            sf.write(data / f"{item}.wav", recording(a, take, 2.0, rng), RATE, subtype="PCM_16")
            rows.append(f"{item},{item}.wav,take {take} of band {a},band-{a}")
    (data / "manifest.csv").write_text("item_id,audio_uri,caption,artist\n" + "\n".join(rows) + "\n")
    clips = data / "clips"
    clips.mkdir()
    for i in range(LOCAL + URIS):
        sf.write(clips / f"q-{i:02d}.wav", recording(i % ARTISTS, i % 4, 1.0, rng), RATE, subtype="PCM_16")
    (clips / "corrupt.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEnot audio at all")
    for name, value in {
        "DAGSTER_HOME": str(home),
        "TDA_STORAGE_URL": str(root_dir),
        "TDA_TRAIN_STEPS": "20",
        "TDA_DRAWS": "4",
        "TDA_ALLOWED_AUDIO_ROOTS": str(other),
    }.items():
        mp.setenv(name, value)
    mp.delenv("TDA_MANIFEST", raising=False)  # the manifest's folder is allowed because the root was prepared from it
    results = {"prepare": run("prepare", "--manifest", str(data / "manifest.csv"))}
    for i in range(LOCAL):
        results[f"add-{i}"] = run(
            "add-query", f"take {i} of a band", "--id", f"local-{i:02d}", "--audio", str(clips / f"q-{i:02d}.wav")
        )
    for i in range(LOCAL, LOCAL + URIS):
        results[f"add-{i}"] = run(
            "add-query", f"take {i} of a band", "--id", f"uri-{i:02d}", "--audio", f"file://{clips}/q-{i:02d}.wav"
        )
    results["refused-missing"] = run("add-query", "a harp", "--id", "missing", "--audio", str(clips / "nowhere.wav"))
    results["refused-corrupt"] = run("add-query", "a harp", "--id", "corrupt", "--audio", str(clips / "corrupt.wav"))
    results["refused-prompt"] = run("add-query", " ", "--id", "blank", "--audio", str(clips / "q-00.wav"))
    root = Storage(str(root_dir))
    for qid, (body, _) in DROPPED.items():
        text = body if isinstance(body, str) else json.dumps({k: v.format(clips=clips) for k, v in body.items()})
        root.write_bytes(f"inbox/{qid}.json", text.encode())
    results["queries-before"] = run("queries")
    results["run-inbox"] = run("run-inbox")
    results["queries-after"] = run("queries")
    results["run-inbox-again"] = run("run-inbox")
    yield root, clips, results
    mp.undo()


def test_every_clip_added_from_the_folder_beside_the_manifest_is_accepted(drained_inbox):
    _, _, results = drained_inbox
    assert results["prepare"][0] == 0, results["prepare"]
    assert {k: v[0] for k, v in results.items() if k.startswith("add-")} == {f"add-{i}": 0 for i in range(LOCAL + URIS)}


def test_a_local_clip_is_copied_into_the_root_and_a_uri_beside_the_manifest_is_kept(drained_inbox):
    root, clips, _ = drained_inbox
    local = json.loads(root.read_bytes("inbox/local-03.json"))
    assert local["audio_uri"] == root.uri("uploads/local-03.wav")
    assert root.read_bytes("uploads/local-03.wav") == (clips / "q-03.wav").read_bytes()
    assert json.loads(root.read_bytes("inbox/uri-21.json"))["audio_uri"] == f"file://{clips}/q-21.wav"


@pytest.mark.parametrize(
    "case, query_id, says",
    [
        ("refused-missing", "missing", "nowhere.wav does not exist: give a path"),
        ("refused-corrupt", "corrupt", "cannot be decoded"),
        ("refused-prompt", "blank", "the prompt is empty"),
    ],
)
def test_a_bad_clip_or_prompt_is_refused_at_once_naming_the_fix(drained_inbox, case, query_id, says):
    root, _, results = drained_inbox
    code, _, err = results[case]
    assert code == 1 and says in err, err
    assert not root.exists(f"inbox/{query_id}.json") and not root.glob(f"uploads/{query_id}.*")


def test_queries_names_every_invalid_query_with_its_reason_before_and_after_the_drain(drained_inbox):
    _, _, results = drained_inbox
    for name in ("queries-before", "queries-after"):
        code, out, _ = results[name]
        assert code == 0
        named = {line.split(": ")[1]: line for line in out.splitlines() if line.startswith("  invalid: ")}
        assert set(named) == set(DROPPED), out
        assert all(DROPPED[q][1] in line for q, line in named.items()), named


def test_the_drain_attributes_every_valid_query_and_names_the_invalid_ones(drained_inbox):
    root, _, results = drained_inbox
    code, out, _ = results["run-inbox"]
    assert code == 0, out
    assert f"{LOCAL + URIS} queries attributed, 0 runs failed" in out
    assert {line.split(": ")[1] for line in out.splitlines() if line.startswith("  invalid: ")} == set(DROPPED)
    attributed = set(read_tables(root, "attribution_scores")["query_id"].unique())
    assert attributed == {f"local-{i:02d}" for i in range(LOCAL)} | {f"uri-{i:02d}" for i in range(LOCAL, LOCAL + URIS)}


def test_queries_shows_every_valid_query_attributed_after_the_drain(drained_inbox):
    _, _, results = drained_inbox
    summary = results["queries-after"][1].split("\n  invalid:")[0].strip().splitlines()[-1]
    assert summary == f"{LOCAL + URIS} attributed, {len(DROPPED)} invalid", summary


def test_run_inbox_exits_non_zero_when_queries_wait_and_none_can_run(drained_inbox):
    _, _, results = drained_inbox
    code, out, err = results["run-inbox-again"]
    assert code == 1
    assert f"{len(DROPPED)} queries were waiting and none was attributed ({len(DROPPED)} invalid" in err, err
