"""Killed steps: `kill -9` of a real step process in the middle of its table write leaves the previous file or none,
never half of one; no reader takes the stray temp file for a table; the rerun equals an uninterrupted run, byte for
byte.

The child process materializes one step with the product code unchanged; only its `os.replace` is held (from the test
side) once Storage's atomic write has written and flushed the temp file, just before the rename, and killed there.
"""

from __future__ import annotations

import fnmatch
import json
import os
import posixpath
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tda_assets.defs.configs import unlearning_run_config
from tda_assets.defs.partitions import query_config_key
from tda_assets.io.query_engine import QueryEngine
from tda_assets.io.registry import LAYOUT
from tda_assets.io.storage import Storage, temp_name
from tda_assets.io.tables import read_table, read_tables
from tests.faults.conftest import CONFIG, TRAIN_STEPS, runner_on, snapshot

REPO = Path(__file__).resolve().parents[2]
CHILD = r'''
import json, os, sys, time
from pathlib import Path

root, asset, partition, marker, run_config = sys.argv[1:]
real_replace = os.replace


def held_replace(src, dst, *args, **kwargs):
    """The rename that would publish the step's table: record the temp file's name, then wait to be killed."""
    if str(dst).startswith(f"{root}/{asset}/"):
        Path(marker + ".part").write_text(json.dumps({"temp": str(src), "final": str(dst)}))
        real_replace(marker + ".part", marker)
        time.sleep(600)
    return real_replace(src, dst, *args, **kwargs)


os.replace = held_replace
import torch
torch.set_num_threads(1)
from dagster import DagsterInstance
from tda_assets.experiments.runner import Runner

runner = Runner.create(DagsterInstance.ephemeral(), root, log=lambda _m: None)
if asset != "baseline_losses":  # a per-configuration asset: the query's (query × default) partition
    from tda_assets.defs.partitions import query_config_key
    runner.add_partitions(partition, "default")
    partition = query_config_key(partition, "default")
runner.run([asset], partition, json.loads(run_config))
'''


def kill_mid_write(tmp_path: Path, root_dir: Path, asset: str, partition: str, run_config: dict) -> dict[str, str]:
    """Run one step in a child process, SIGKILL it inside the write of its table; returns the temp and final paths."""
    script, marker = tmp_path / "child.py", tmp_path / "held.json"
    script.write_text(CHILD)
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "TDA_TRAIN_STEPS": TRAIN_STEPS,
        "HF_HUB_OFFLINE": "1",
    }
    child = subprocess.Popen(
        [sys.executable, str(script), str(root_dir), asset, partition, str(marker), json.dumps(run_config)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 240
        while not marker.exists():
            if child.poll() is not None:
                pytest.fail(
                    f"the {asset} step ended before its write ({child.returncode}): {child.stderr.read()[-3000:]}"
                )
            if time.monotonic() > deadline:
                pytest.fail(f"the {asset} step did not reach its write in 240 s")
            time.sleep(0.05)
        child.send_signal(signal.SIGKILL)
        assert child.wait(30) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        child.stderr.close()
    return json.loads(marker.read_text())


def without_hidden(files: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in files.items() if not any(part.startswith(".") for part in k.split("/"))}


def test_kill_9_mid_write_of_a_baseline_shard_leaves_none_and_the_rerun_equals_the_uninterrupted_run(
    reference, tmp_path, monkeypatch
):
    root_dir = reference.copy(tmp_path / "storage")
    root = Storage(str(root_dir))
    shards = read_tables(root, "baseline_losses")
    shard = shards["shard"].value_counts(sort=True)["shard"][0]  # the shard with the most items
    (shard_file,) = [p for p in root_dir.glob(f"baseline_losses/*/*/shard={shard}/*")]
    uninterrupted = read_table(Storage(str(reference.root)), "baseline_losses", **_keys(shard_file, root_dir))
    shard_file.unlink()

    held = kill_mid_write(tmp_path, root_dir, "baseline_losses", shard, {})

    assert held["final"] == str(shard_file) and not shard_file.exists()  # none, never half of one
    temp = Path(held["temp"])
    assert temp.parent == shard_file.parent and temp.name.startswith(".") and temp.stat().st_size > 0
    assert str(temp.relative_to(root_dir)) not in root.glob("baseline_losses/*/*/*/*")
    assert read_tables(root, "baseline_losses").height == shards.height - uninterrupted.height
    assert QueryEngine(root).table_counts()["baseline_losses"] == shards.height - uninterrupted.height

    runner_on(str(root_dir), monkeypatch).training_side_if_needed()  # resumes: only the baseline losses are missing

    assert read_table(root, "baseline_losses", **_keys(shard_file, root_dir)).equals(uninterrupted)
    assert without_hidden(snapshot(root_dir)) == snapshot(reference.root)  # nothing lost, nothing else changed


def test_kill_9_mid_write_of_unlearned_losses_leaves_the_previous_file_and_the_rerun_equals_it(
    reference, tmp_path, monkeypatch
):
    root_dir = reference.copy(tmp_path / "storage")
    root = Storage(str(root_dir))
    (losses_file,) = root_dir.glob(f"unlearned_losses/*/*/query_id={reference.query_id}/config_id={CONFIG.config_id}/*")
    previous = losses_file.read_bytes()
    counts = QueryEngine(root).table_counts()
    run_config = {
        "ops": {"unlearned_losses": unlearning_run_config(CONFIG).to_config_dict()["ops"]["unlearned_losses"]}
    }

    held = kill_mid_write(tmp_path, root_dir, "unlearned_losses", reference.query_id, run_config)

    assert held["final"] == str(losses_file) and losses_file.read_bytes() == previous  # the previous file, whole
    assert Path(held["temp"]).name.startswith(".") and Path(held["temp"]).exists()
    assert QueryEngine(root).table_counts() == counts  # the stray temp file is no table's row

    runner = runner_on(str(root_dir), monkeypatch)
    runner.add_partitions(reference.query_id, "default")
    runner.run(["unlearned_losses"], query_config_key(reference.query_id, "default"), run_config)

    keys = _keys(losses_file, root_dir)
    uninterrupted = read_table(Storage(str(reference.root)), "unlearned_losses", **keys)
    assert read_table(root, "unlearned_losses", **keys).equals(uninterrupted)
    assert without_hidden(snapshot(root_dir)) == snapshot(reference.root)


def _keys(path: Path, root_dir: Path) -> dict[str, str]:
    """The hive key values of a table file (`checkpoint_id=…/…/part-0.parquet`)."""
    return dict(part.split("=", 1) for part in path.relative_to(root_dir).parts if "=" in part)


def test_no_reader_of_any_layout_entry_takes_a_temp_file_for_one_of_its_files(tmp_path):
    root = Storage(str(tmp_path))
    for entry in LAYOUT.values():
        real = entry.key(**{f: f"v{i}" for i, f in enumerate(entry.fields)})
        folder, name = posixpath.split(real)
        root.write_bytes(real, b"x")
        root.write_bytes(posixpath.join(folder, temp_name(name)), b"half")  # as a killed write leaves it
        assert root.glob(entry.glob()) == [real], entry.name
        if entry.is_table:  # DuckDB's views glob the same patterns segment by segment
            temp = posixpath.join(folder, temp_name(name))
            assert not all(fnmatch.fnmatchcase(p, g) for p, g in zip(temp.split("/"), entry.glob().split("/"))), (
                entry.name
            )
        root.delete(real.split("/")[0], recursive=True)
