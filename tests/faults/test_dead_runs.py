"""Runs whose process is gone: judged by host and pid (or a heartbeat from another host), released with the cause, their
pool slots freed, no longer counted in flight; a step waiting for a slot names its holder and gives up at the bound."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import uuid

import pytest
from dagster import DagsterInstance, DagsterRun, DagsterRunStatus

from resources.env import REPO_ROOT
from tda_assets.data.inbox import add_query
from tda_assets.data.query_state import STORAGE_TAG
from tda_assets.defs.partitions import query_config_key
from tda_assets.defs.query_runs import IN_PROGRESS, run_tags, runs_of_root
from tda_assets.defs.run_health import (
    HEARTBEAT_TAG,
    HOST_TAG,
    PID_START_TAG,
    PID_TAG,
    RELEASED_TAG,
    dead_reason,
    pid_start,
    process_tags,
    release_dead_runs,
)
from tda_assets.defs.tags import GPU_POOL
from tda_assets.experiments.runner import Runner
from tda_assets.experiments.supervise import SlotWaitTimeout
from tests.faults.conftest import TRAIN_STEPS, runner_on

HOST = "node-a"
NOW = 1_000_000.0


def tags(host: str = HOST, pid: int = 42, start: str = "777", beat: float = NOW) -> dict[str, str]:
    return {HOST_TAG: host, PID_TAG: str(pid), PID_START_TAG: start, HEARTBEAT_TAG: str(int(beat))}


def test_a_run_whose_pid_is_alive_on_this_host_is_alive():
    assert dead_reason(tags(), HOST, NOW, 300, alive=lambda pid, start: (pid, start) == (42, "777")) is None


def test_a_run_whose_pid_is_gone_on_this_host_is_dead_and_the_reason_names_pid_and_host():
    assert (
        dead_reason(tags(), HOST, NOW, 300, alive=lambda pid, start: False) == "its process (pid 42 on node-a) is gone"
    )


def test_a_reused_pid_is_another_process():
    me, host = os.getpid(), socket.gethostname()
    assert dead_reason(tags(host=host, pid=me, start=pid_start(me)), host, NOW, 300) is None
    assert (
        dead_reason(tags(host=host, pid=me, start="1"), host, NOW, 300) == f"its process (pid {me} on {host}) is gone"
    )


def test_a_run_of_another_host_is_dead_only_when_its_heartbeat_is_older_than_the_bound():
    assert dead_reason(tags(beat=NOW - 299), "node-b", NOW, 300) is None
    assert (
        dead_reason(tags(beat=NOW - 301), "node-b", NOW, 300)
        == "no heartbeat from its process (pid 42 on node-a) for 301 s (bound 300 s)"
    )


def test_a_run_without_a_pid_tag_is_left_to_dagsters_run_monitoring():
    assert dead_reason({STORAGE_TAG: "/root"}, HOST, NOW, 0) is None


@pytest.fixture
def instance(tmp_path, monkeypatch) -> DagsterInstance:
    """A persistent sqlite instance with the product's dagster.yaml (the `gpu` pool has one slot)."""
    home = tmp_path / "home"
    home.mkdir()
    shutil.copy(REPO_ROOT / "dagster_home" / "dagster.yaml", home / "dagster.yaml")
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    with DagsterInstance.get() as inst:
        inst.event_log_storage.set_concurrency_slots(GPU_POOL, 1)
        yield inst


def gone_pid() -> int:
    """The pid of a process that has exited."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def started_run(
    instance: DagsterInstance, root_url: str, run_tags_: dict[str, str], slot_step: str | None = None
) -> str:
    """A STARTED attribution run of `root_url` with `run_tags_`; holding the gpu slot for `slot_step` when given."""
    run_id = str(uuid.uuid4())
    instance.add_run(
        DagsterRun(
            job_name="attribute_config",
            run_id=run_id,
            status=DagsterRunStatus.STARTED,
            tags={**run_tags("attribute", root_url), "dagster/partition": "q0|default", **run_tags_},
        )
    )
    if slot_step:
        assert instance.event_log_storage.claim_concurrency_slot(GPU_POOL, run_id, slot_step).is_claimed
    return run_id


def held_slots(instance: DagsterInstance) -> list[tuple[str, str]]:
    info = instance.event_log_storage.get_concurrency_info(GPU_POOL)
    return [(s.run_id, s.step_key) for s in info.claimed_slots] + [(p.run_id, p.step_key) for p in info.pending_steps]


def test_a_killed_commands_run_is_failed_with_its_cause_its_slot_freed_and_no_longer_in_flight(instance):
    dead = started_run(instance, "/root", {**process_tags("x"), PID_TAG: str(gone_pid())}, slot_step="unlearned_losses")
    alive = started_run(instance, "/root", process_tags("y"))
    assert len(runs_of_root(instance, IN_PROGRESS, "/root")) == 1  # as `tda queries` and the sensor count them
    assert release_dead_runs(instance, 300, log=lambda _m: None) == [dead]
    record = instance.get_run_record_by_id(dead)
    assert record.dagster_run.status == DagsterRunStatus.FAILURE
    assert "is gone" in record.dagster_run.tags[RELEASED_TAG]
    failure = instance.all_logs(dead)[-1]
    assert failure.dagster_event.event_type_value == "PIPELINE_FAILURE" and "is gone" in failure.message
    assert held_slots(instance) == []
    assert instance.get_run_record_by_id(alive).dagster_run.status == DagsterRunStatus.STARTED


def test_the_slots_a_finished_run_still_holds_are_freed(instance):
    run_id = started_run(instance, "/root", {}, slot_step="unlearned_model")
    instance.report_run_failed(instance.get_run_by_id(run_id), "failed elsewhere")
    assert held_slots(instance) != []
    release_dead_runs(instance, 300, log=lambda _m: None)
    assert held_slots(instance) == []


def test_a_step_waiting_for_a_slot_logs_the_holder_and_gives_up_at_the_bound(
    instance, reference, tmp_path, monkeypatch
):
    root_dir = reference.copy(tmp_path / "root")
    holder = started_run(instance, str(root_dir), process_tags("holder"), slot_step="unlearned_losses")  # this process
    monkeypatch.setenv("TDA_TRAIN_STEPS", TRAIN_STEPS)
    monkeypatch.setenv("TDA_SLOT_WAIT_S", "3")
    lines: list[str] = []
    runner = Runner.create(instance, str(root_dir), log=lines.append)
    start = time.monotonic()
    with pytest.raises(SlotWaitTimeout) as failed:
        runner.clip(reference.query_id)
    assert time.monotonic() - start < 15
    assert f"held by run {holder} (step unlearned_losses" in str(failed.value)
    assert "dagster instance concurrency set gpu" in str(failed.value) and "TDA_SLOT_WAIT_S=3" in str(failed.value)
    assert any("waits for a slot of pool 'gpu'" in line and holder in line for line in lines)
    (mine,) = [r for r in instance.get_run_records() if r.dagster_run.run_id != holder]
    assert mine.dagster_run.status == DagsterRunStatus.FAILURE and "waited" in mine.dagster_run.tags[RELEASED_TAG]
    assert held_slots(instance) == [(holder, "unlearned_losses"), (holder, "unlearned_losses")]  # its slot, its claim


def test_a_query_whose_clip_run_died_before_all_its_similarity_scores_gets_its_clip_run_again(
    reference, tmp_path, monkeypatch
):
    root_dir = reference.copy(tmp_path / "root")
    runner = runner_on(str(root_dir), monkeypatch)
    add_query(runner.root, "a slow piano melody", "half")
    runner.clip("half")
    requested = lambda: [(r.job_name, str(r.partition_key)) for r in runner.sensor_tick()]  # noqa: E731
    assert requested() == [("attribute_config", str(query_config_key("half", "default")))]
    shutil.rmtree(
        root_dir / "similarity_scores" / "query_id=half" / "method=similarity:internal"
    )  # as a kill leaves it
    assert requested() == [("query_clip", "half")]
