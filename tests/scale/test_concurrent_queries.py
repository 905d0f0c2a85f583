"""Two query runs at once on one storage root, as the inbox sensor requests them: multiprocess executor, a `gpu`
pool of 2, against a real Postgres instance (dagster-postgres, chosen by TDA_INSTANCE) and against the default sqlite
instance. Both runs complete, nothing fails on a lock, and every table holds every row."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from dagster import (
    DagsterEventType,
    DagsterInstance,
    DagsterRunStatus,
    Definitions,
    RunRequest,
    SensorResult,
    build_sensor_context,
)
from dagster._core.definitions.reconstruct import ReconstructableRepository
from dagster._grpc.types import ExecuteRunArgs
from dagster._serdes import serialize_value

from resources.env import REPO_ROOT, INSTANCES, use_dagster_home
from tda_assets.data.demo import builtin_queries
from tda_assets.definitions import build_definitions
from tda_assets.defs.sensors import query_inbox_sensor
from tda_assets.defs.tags import GPU_POOL
from tda_assets.io.query_engine import QueryEngine
from tests.trained_roots import TINY

QUERIES = 2
JOBS = ("query_clip", "attribute_config")  # the sensor's jobs, by name: each query's clip, then its default attribution
CODE_LOCATION = "tda_assets.definitions"  # the run workers and their steps rebuild the Definitions from the environment
LOCK_ERROR = re.compile(
    r"database is locked|deadlock detected|could not (?:obtain|set) lock|conflicting lock|lock timeout"
    r"|\bLockError\b",
    re.IGNORECASE,
)  # sqlite, Postgres, DuckDB, filelock
# one torch thread per process: two runs share two cores, and on busy cores a second OpenMP thread spins (measured here:
# the tiny model's 60 training steps took 355 s with 2 threads against 5 s with 1 while other tests ran)
TEST_ENV = {**TINY.env, "TDA_EXECUTOR": "multiprocess", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
# the multiprocess executor forks its step processes from a server that imported the code location once (a step starts
# in about a second instead of re-importing torch and diffusers); the same run config works for any multiprocess run
FORKSERVER = {
    "execution": {"config": {"start_method": {"forkserver": {"preload_modules": ["tda_assets.definitions"]}}}}
}


@dataclass
class Scenario:
    """What two concurrent sensor runs left: the instance, the storage root, the requests and the run records."""

    kind: str
    instance: DagsterInstance
    root: Path
    query_ids: list[str]
    requests: list[RunRequest]
    run_ids: list[str]
    logs: Path
    gpu_slots: int
    peak_gpu_steps: int


def sensor_requests(instance: DagsterInstance, defs: Definitions) -> list[RunRequest]:
    """One tick of the inbox sensor: its partitions added to the instance, its run requests with their partition
    tags."""
    resources = defs.resources
    result = query_inbox_sensor(
        build_sensor_context(
            instance=instance,
            resources={"storage": resources["storage"], "inbox": resources["inbox"], "protocol": resources["protocol"]},
        )
    )
    assert isinstance(result, SensorResult)
    for request in result.dynamic_partitions_requests or []:
        instance.add_dynamic_partitions(request.partitions_def_name, list(request.partition_keys))
    return [
        r.with_resolved_tags_and_config(defs.resolve_job_def(r.job_name), [], instance)
        for r in result.run_requests or []
    ]


def launch_at_once(instance: DagsterInstance, defs: Definitions, requests: list[RunRequest], logs: Path) -> list[str]:
    """Create one run per request and start all their run workers at once, as DefaultRunLauncher does (a
    `dagster api execute_run` process per run, which runs the steps with the multiprocess executor); wait; run ids.

    Processes, not threads: two `execute_job` calls in one process deadlock in `logging.config.dictConfig`.
    """
    recon = ReconstructableRepository.for_module(CODE_LOCATION, "from_environment", working_directory=str(REPO_ROOT))
    origins = {r.job_name: recon.get_reconstructable_job(r.job_name).get_python_origin() for r in requests}
    runs = [
        instance.create_run_for_job(
            defs.resolve_job_def(r.job_name),
            run_config={**(r.run_config or {}), **FORKSERVER},
            tags=r.tags,
            job_code_origin=origins[r.job_name],
            asset_selection=set(r.asset_selection) if r.asset_selection else None,
        )
        for r in requests
    ]
    workers = []
    try:
        for run, request in zip(runs, requests):
            origin = origins[request.job_name]
            args = serialize_value(
                ExecuteRunArgs(job_origin=origin, run_id=run.run_id, instance_ref=instance.get_ref())
            )
            with open(logs / f"{run.run_id}.log", "w") as out:
                workers.append(
                    subprocess.Popen(
                        [sys.executable, "-m", "dagster", "api", "execute_run", args],
                        stdout=out,
                        stderr=subprocess.STDOUT,
                        cwd=REPO_ROOT,
                    )
                )
        for worker in workers:
            worker.wait(timeout=600)
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
    return [run.run_id for run in runs]


def peak_concurrent_steps(instance: DagsterInstance, run_ids: list[str], steps: set[str]) -> int:
    """The most of `steps` (by step key, across the runs) that were running at one moment, from start/end events."""
    ends = {DagsterEventType.STEP_SUCCESS, DagsterEventType.STEP_FAILURE}
    edges = []
    for run_id in run_ids:
        for entry in instance.all_logs(run_id, of_type={DagsterEventType.STEP_START, *ends}):
            if entry.step_key in steps:
                edges.append((entry.timestamp, -1 if entry.dagster_event.event_type in ends else 1))
    running = peak = 0
    for _, change in sorted(edges):
        running += change
        peak = max(peak, running)
    return peak


@pytest.fixture(scope="module", params=["postgres", "sqlite"])
def scenario(request, trained_roots, tmp_path_factory) -> Scenario:
    """Two built-in queries in the inbox of a copy of the TINY root (the smallest corpus test_pipeline attributes on:
    12 items), one sensor tick, both runs at once; the instance chosen as a user chooses it."""
    kind = request.param
    work = tmp_path_factory.mktemp(kind)
    root_dir = trained_roots.copy(TINY, work / "storage")
    home = work / "home"
    home.mkdir()
    shutil.copy(REPO_ROOT / INSTANCES[kind] / "dagster.yaml", home / "dagster.yaml")
    with pytest.MonkeyPatch.context() as mp:
        for name, value in {
            **TEST_ENV,
            "TDA_INSTANCE": kind,
            "DAGSTER_HOME": str(home),
            "TDA_STORAGE_URL": str(root_dir),
        }.items():
            mp.setenv(name, value)
        if kind == "postgres":
            server = request.getfixturevalue("postgres")
            for name, value in server.dagster_env(server.create_database("concurrent")).items():
                mp.setenv(name, value)
        use_dagster_home()
        instance = DagsterInstance.get()
        instance.event_log_storage.set_concurrency_slots(GPU_POOL, 2)  # = `dagster instance concurrency set gpu 2`
        defs = build_definitions()
        query_ids = builtin_queries(defs.resources["storage"].root(), artists=QUERIES)
        requests, run_ids = [], []
        for _ in JOBS:  # tick 1 requests the clips, tick 2 (clips in the root) the attributions: each pair at once
            tick = sensor_requests(instance, defs)
            requests += tick
            run_ids += launch_at_once(instance, defs, tick, work)
        gpu_steps = {
            node.name
            for name in JOBS
            for node in defs.resolve_job_def(name).graph.nodes
            if node.definition.pool == GPU_POOL
        }
        yield Scenario(
            kind,
            instance,
            root_dir,
            query_ids,
            requests,
            run_ids,
            work,
            instance.event_log_storage.get_concurrency_info(GPU_POOL).slot_count,
            peak_concurrent_steps(instance, run_ids, gpu_steps),
        )
        instance.dispose()


def test_the_instance_is_the_one_tda_instance_names(scenario):
    from dagster._core.storage.event_log import SqliteEventLogStorage
    from dagster._core.storage.runs import SqliteRunStorage
    from dagster_postgres import PostgresEventLogStorage, PostgresRunStorage

    run_storage, event_log = scenario.instance.run_storage, scenario.instance.event_log_storage
    if scenario.kind == "postgres":
        assert isinstance(run_storage, PostgresRunStorage) and isinstance(event_log, PostgresEventLogStorage)
        assert event_log.postgres_url.startswith("postgresql+psycopg2://tda:") and event_log.postgres_url.endswith(
            "/concurrent"
        )
    else:
        assert isinstance(run_storage, SqliteRunStorage) and isinstance(event_log, SqliteEventLogStorage)


def test_the_sensor_requests_a_clip_then_an_attribution_run_per_inbox_query_and_all_succeed(scenario):
    assert [r.job_name for r in scenario.requests] == [JOBS[0]] * QUERIES + [JOBS[1]] * QUERIES
    records = [scenario.instance.get_run_record_by_id(run_id) for run_id in scenario.run_ids]
    assert [r.dagster_run.status for r in records] == [DagsterRunStatus.SUCCESS] * 2 * QUERIES, (
        f"run worker logs: {sorted(map(str, scenario.logs.glob('*.log')))}"
    )
    for request, record in zip(scenario.requests, records):
        assert request.tags.items() <= record.dagster_run.tags.items()  # the sensor's partition and tags
    assert [r.dagster_run.job_name for r in records] == [r.job_name for r in scenario.requests]


def test_the_runs_of_each_tick_overlapped_in_time(scenario):
    for pair in (scenario.run_ids[:QUERIES], scenario.run_ids[QUERIES:]):
        first, second = (scenario.instance.get_run_record_by_id(run_id) for run_id in pair)
        assert first.start_time < second.end_time and second.start_time < first.end_time


def test_steps_ran_in_processes_of_the_multiprocess_executor(scenario):
    for run_id in scenario.run_ids:
        messages = [e.message for e in scenario.instance.all_logs(run_id) if e.message]
        assert any("Executing steps using multiprocess executor" in m for m in messages), run_id


def test_the_gpu_pool_held_two_slots_and_never_more_gpu_steps(scenario):
    assert scenario.gpu_slots == 2
    assert 1 <= scenario.peak_gpu_steps <= 2


def test_no_step_failed_and_no_lock_error_was_logged(scenario):
    for run_id in scenario.run_ids:
        logs = scenario.instance.all_logs(run_id)
        failures = [
            e
            for e in logs
            if e.dagster_event
            and e.dagster_event.event_type
            in (DagsterEventType.STEP_FAILURE, DagsterEventType.RUN_FAILURE, DagsterEventType.ENGINE_EVENT)
            and e.dagster_event.event_specific_data is not None
            and getattr(e.dagster_event.event_specific_data, "error", None) is not None
        ]
        assert failures == []
        texts = [
            str(e.message) + str(getattr(e.dagster_event.event_specific_data, "error", "") if e.dagster_event else "")
            for e in logs
        ]
        worker_output = (scenario.logs / f"{run_id}.log").read_text()  # the run worker's and its steps' stderr too
        assert [t for t in [*texts, *worker_output.splitlines()] if LOCK_ERROR.search(t)] == []


def test_every_table_is_complete_for_both_queries(scenario):
    from tda_assets.io.storage import Storage

    engine = QueryEngine(Storage(str(scenario.root)))
    n = TINY.artists * TINY.clips
    counts = engine.table_counts()
    assert counts["queries"] == QUERIES and counts["unlearning_runs"] == QUERIES
    per_method = engine.sql(
        "select query_id, method, count(*) as n, count(distinct item_id) as items, min(rank) as lo, "
        "max(rank) as hi from attributions group by all order by all"
    )
    assert sorted(set(per_method["query_id"])) == sorted(scenario.query_ids)
    assert "unlearning" in set(per_method["method"]) and per_method["method"].n_unique() >= 2
    assert set(per_method.select("n", "items", "lo", "hi").rows()) == {(n, n, 1, n)}
    assert counts["attributions"] == QUERIES * n * per_method["method"].n_unique()
