"""A killed `tda run-inbox` never wedges the instance: SIGKILLed at seeded random moments three times and restarted, the
drain ends whole (every query attributed once, the root equal to an uninterrupted drain's, no run left unfinished, no
pool slot held); SIGTERM stops it within seconds, its run failed with the cause and its slots free.

The drains are real `tda run-inbox` processes on a persistent instance, sqlite or Postgres (a real server on 127.0.0.1),
with the product's dagster.yaml (the `gpu` pool has one slot), over a copy of the faults' reference root with six
queries in its inbox (the three kills land in the first three `tda run-inbox` processes' first two runs of a step; the
fourth drains the rest).
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import polars as pl
import pytest
from dagster import DagsterInstance, DagsterRunStatus, RunsFilter

from safetensors import safe_open

from resources.env import INSTANCES, REPO_ROOT
from tda_assets.data.inbox import add_query
from tda_assets.data.query_state import STEP_TAG
from tda_assets.defs.run_health import NOT_FINISHED, PID_TAG, RELEASED_TAG
from tda_assets.io.storage import Storage
from tda_assets.io.tables import read_tables
from tests.faults.conftest import TRAIN_STEPS, one_torch_thread, runner_on, snapshot
from tests.faults.test_killed_steps import without_hidden
from tests.scale.postgres_server import PostgresServer, postgres_bin_dir, start_postgres

QUERIES = 6  # enough for the kills (SEED's: the 2nd clip run, the 1st and 2nd attribution runs of a process)
SEED = 25  # the kill moments
KILLED_IN = ("clip", "attribute", "attribute")  # the query run each kill lands in: the `gpu` slot held by query_clips,
# unlearned_model or unlearned_losses, or a moment between steps
PROMPTS = (
    "a plucked guitar tune",
    "a slow piano melody",
    "a fast bright synth line",
    "a low droning bass",
    "a soft flute phrase",
    "a bouncy marimba loop",
)


@dataclass
class Drain:
    """A storage root with `QUERIES` queries in its inbox and the instance folder its `tda run-inbox` processes use."""

    root: Path
    home: Path
    env: dict[str, str]
    query_ids: list[str]

    def start(self, log: Path) -> subprocess.Popen:
        with open(log, "a") as out:
            return subprocess.Popen(
                [sys.executable, "-m", "tda_assets.cli", "run-inbox"],
                env=self.env,
                cwd=REPO_ROOT,
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    def instance(self) -> DagsterInstance:
        """The instance the drains use (the fixture set DAGSTER_HOME and, for Postgres, DAGSTER_PG_*)."""
        return DagsterInstance.get()


def add_queries(root_dir: Path) -> list[str]:
    root = Storage(str(root_dir))
    return [add_query(root, PROMPTS[i % len(PROMPTS)], f"chaos-{i:02d}", seed=i).query_id for i in range(QUERIES)]


@pytest.fixture(scope="module")
def uninterrupted(reference, tmp_path_factory) -> dict[str, object]:
    """The reference root with the same queries, drained in one go (in process): the `contents` of its files."""
    root_dir = reference.copy(tmp_path_factory.mktemp("uninterrupted") / "storage")
    add_queries(root_dir)
    with pytest.MonkeyPatch.context() as mp, one_torch_thread():
        drain = runner_on(str(root_dir), mp).drain_inbox()
    assert len(drain.attributed) == QUERIES and drain.failed == []
    return contents(root_dir)


@pytest.fixture(scope="module")
def postgres() -> PostgresServer:
    """A PostgreSQL server on 127.0.0.1 (as tests/scale starts it), for the Postgres instance."""
    bin_dir = postgres_bin_dir()
    if bin_dir is None:
        pytest.skip("no PostgreSQL server binaries: install the test extras (pgserver) or Debian's postgresql")
    server = start_postgres(bin_dir)
    yield server
    server.stop()


@pytest.fixture(params=["sqlite", "postgres"])
def drain(request, reference, tmp_path, monkeypatch) -> Drain:
    """The queries in a copy of the reference root, and an instance of the kind `TDA_INSTANCE` names (the product's
    dagster.yaml for it: the `gpu` pool has one slot)."""
    kind = request.param
    root_dir = reference.copy(tmp_path / "storage")
    home = tmp_path / "home"
    home.mkdir()
    shutil.copy(REPO_ROOT / INSTANCES[kind] / "dagster.yaml", home / "dagster.yaml")
    extra = {"DAGSTER_HOME": str(home), "TDA_INSTANCE": kind}
    if kind == "postgres":
        server = request.getfixturevalue("postgres")
        extra.update(server.dagster_env(server.create_database(f"drain_{uuid.uuid4().hex[:8]}")))
    for name, value in extra.items():  # this process reads the same instance
        monkeypatch.setenv(name, value)
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO_ROOT),
        "TDA_STORAGE_URL": str(root_dir),
        "TDA_TRAIN_STEPS": TRAIN_STEPS,
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
    }
    return Drain(root_dir, home, env, add_queries(root_dir))


WALL_TIME = {"unlearning_runs": ["seconds"]}  # the only measured durations in the root's tables


def contents(root_dir: Path) -> dict[str, object]:
    """`path → content` of every file of a root but the temp files of killed writes: tables as rows (the root's own path
    written as `<root>`, wall times left out), tensor files as metadata and tensors, anything else as its bytes."""
    out: dict[str, object] = {}
    for path, digest in without_hidden(snapshot(root_dir)).items():
        file = root_dir / path
        if path.endswith(".parquet"):
            frame = pl.read_parquet(file).drop(WALL_TIME.get(path.split("/")[0], []))
            out[path] = frame.with_columns(
                pl.col(pl.String).str.replace_all(str(root_dir), "<root>", literal=True)
            ).rows()
        elif path.endswith(".safetensors"):
            with safe_open(file, "pt") as f:
                out[path] = (f.metadata(), {k: f.get_tensor(k).numpy().tobytes() for k in sorted(f.keys())})
        else:
            out[path] = digest
    return out


def runs_of(instance: DagsterInstance, pid: int) -> list:
    return list(instance.get_run_records(RunsFilter(tags={PID_TAG: str(pid)})))


def wait_until(condition, child: subprocess.Popen, what: str, log: Path, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if child.poll() is not None:
            pytest.fail(f"`tda run-inbox` ended ({child.returncode}) before {what}: {log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"no {what} within {timeout} s: {log.read_text()[-3000:]}")
        time.sleep(0.1)


def held_slots(instance: DagsterInstance) -> list[tuple[str, str, str]]:
    event_log = instance.event_log_storage
    infos = event_log.get_concurrency_infos(sorted(event_log.get_concurrency_keys()))
    return [(k, s.run_id, s.step_key) for k, i in infos.items() for s in i.claimed_slots] + [
        (k, p.run_id, p.step_key) for k, i in infos.items() for p in i.pending_steps
    ]


def test_kill_9_three_times_during_run_inbox_then_the_drain_ends_whole(drain, uninterrupted, tmp_path):
    rng, log, killed, recover_s = random.Random(SEED), tmp_path / "run-inbox.log", [], []
    instance = drain.instance()
    child = drain.start(log)
    for step in KILLED_IN:
        nth = rng.randint(1, 2)  # killed in its nth run of that step, a random moment after that run started
        started = lambda: [r for r in runs_of(instance, child.pid) if r.dagster_run.tags.get(STEP_TAG) == step]  # noqa: E731
        wait_until(lambda: len(started()) >= nth, child, f"{step} run {nth} of pid {child.pid}", log)
        time.sleep(rng.uniform(0.0, 2.0 if step == "clip" else 9.0))  # an attribution run starts its steps after ~3 s
        child.send_signal(signal.SIGKILL)
        assert child.wait(30) == -signal.SIGKILL
        dead = [r.dagster_run.run_id for r in runs_of(instance, child.pid) if r.dagster_run.status in NOT_FINISHED]
        assert len(dead) <= 1  # the run it was in, left unfinished by the kill (none if it was between runs)
        killed += dead
        restarted = time.monotonic()
        child = drain.start(log)  # releases the dead run before its first run, then drains on
        if dead:
            wait_until(
                lambda: instance.get_run_record_by_id(dead[0]).dagster_run.status == DagsterRunStatus.FAILURE,
                child,
                f"release of run {dead[0]}",
                log,
                timeout=120,
            )
            recover_s.append(time.monotonic() - restarted)
    assert child.wait(900) == 0, log.read_text()[-3000:]
    assert killed, "no kill landed inside a run: change SEED"
    print(f"\nkilled runs released {', '.join(f'{s:.1f}' for s in recover_s)} s after the next `tda run-inbox` started")

    assert [r.dagster_run.run_id for r in instance.get_run_records(RunsFilter(statuses=NOT_FINISHED))] == []
    assert held_slots(instance) == []
    for run_id in killed:
        run = instance.get_run_by_id(run_id)
        assert run.status == DagsterRunStatus.FAILURE and "is gone" in run.tags[RELEASED_TAG]
    root = Storage(str(drain.root))
    runs = read_tables(root, "unlearning_runs")
    assert sorted(runs.filter(runs["query_id"].str.starts_with("chaos-"))["query_id"]) == drain.query_ids  # each once
    succeeded = [
        r.dagster_run.tags["dagster/partition"]
        for r in instance.get_run_records(RunsFilter(statuses=[DagsterRunStatus.SUCCESS], tags={STEP_TAG: "attribute"}))
    ]
    assert len(succeeded) == len(set(succeeded))  # no query attributed twice
    assert contents(drain.root) == uninterrupted  # every table and tensor file, value for value


def test_sigterm_stops_run_inbox_within_seconds_its_run_failed_and_its_slots_free(drain, tmp_path):
    log = tmp_path / "run-inbox.log"
    instance = drain.instance()
    child = drain.start(log)

    def mine() -> list[tuple[str, str, str]]:
        return [s for s in held_slots(instance) if s[1] in {r.dagster_run.run_id for r in runs_of(instance, child.pid)}]

    wait_until(mine, child, "a gpu step of its run holding its slot", log)
    (run_id,) = {s[1] for s in mine()}
    sent = time.monotonic()
    child.send_signal(signal.SIGTERM)
    code = child.wait(60)
    stopped_s = time.monotonic() - sent
    print(f"\n`tda run-inbox` stopped {stopped_s:.1f} s after SIGTERM")

    assert code == 128 + signal.SIGTERM and stopped_s < 10, log.read_text()[-3000:]
    assert "stopped by SIGTERM" in log.read_text()
    run = instance.get_run_by_id(run_id)
    assert run.status == DagsterRunStatus.FAILURE and run.tags[RELEASED_TAG].startswith("stopped by SIGTERM")
    assert held_slots(instance) == []
    assert [r.dagster_run.run_id for r in instance.get_run_records(RunsFilter(statuses=NOT_FINISHED))] == []
