"""Runs whose process is gone, found and released, so a killed command never wedges the instance.

Every run a command launches records where it runs (`tda/host`, `tda/pid`, the pid's start time) and a heartbeat
(`tda/heartbeat`, refreshed every `HEARTBEAT_S` while it runs). A run not finished whose process is gone (same host: the
pid is not alive, or is another process now; another host: no heartbeat within the stated bound) is marked failed with
a message naming the cause and tagged `tda/released`, and its pool slots are freed: its queries are pending again, and a
released run does not count as a failed attempt. Runs without these tags (launched by the daemon) are left to Dagster's
run monitoring (`run_monitoring` in dagster_home/dagster.yaml).
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path
from typing import Callable, Mapping

from dagster import DagsterInstance, DagsterRunStatus, RunsFilter

HOST_TAG, PID_TAG, PID_START_TAG = "tda/host", "tda/pid", "tda/pid_start"
HEARTBEAT_TAG = "tda/heartbeat"  # unix seconds of the last sign of life of the run's process
LAUNCH_TAG = "tda/launch"  # one id per run a command launches: how the command finds the run Dagster made
RELEASED_TAG = "tda/released"  # why the run was ended from outside its execution (process gone, a signal, a wait bound)
HEARTBEAT_S = 30
NOT_FINISHED = [
    DagsterRunStatus.QUEUED,
    DagsterRunStatus.NOT_STARTED,
    DagsterRunStatus.STARTING,
    DagsterRunStatus.STARTED,
    DagsterRunStatus.CANCELING,
]


def pid_start(pid: int) -> str | None:
    """The start time of process `pid` (clock ticks since boot, from /proc), or None if there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22 of proc(5), counted after the command name


def pid_alive(pid: int, start: str | None) -> bool:
    """Whether process `pid` runs and is the one that started at `start` (a reused pid is another process)."""
    if Path("/proc/self/stat").exists():
        now = pid_start(pid)
        return now is not None and (start is None or now == start)
    try:  # no /proc: existence only
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def process_tags(launch_id: str) -> dict[str, str]:
    """The tags that tie a run to this process: host, pid, the pid's start time, a first heartbeat, the launch id."""
    pid = os.getpid()
    return {
        HOST_TAG: socket.gethostname(),
        PID_TAG: str(pid),
        PID_START_TAG: pid_start(pid) or "",
        HEARTBEAT_TAG: str(int(time.time())),
        LAUNCH_TAG: launch_id,
    }


def dead_reason(
    tags: Mapping[str, str],
    host: str,
    now: float,
    stale_after_s: float,
    alive: Callable[[int, str | None], bool] = pid_alive,
) -> str | None:
    """Why the process of a run with `tags` is gone, or None when it is alive or not ours to judge (no pid tag)."""
    if PID_TAG not in tags:
        return None
    pid, where = int(tags[PID_TAG]), tags.get(HOST_TAG, "?")
    if where == host:
        if alive(pid, tags.get(PID_START_TAG) or None):
            return None
        return f"its process (pid {pid} on {where}) is gone"
    age = now - float(tags.get(HEARTBEAT_TAG) or 0)
    if age <= stale_after_s:
        return None
    return f"no heartbeat from its process (pid {pid} on {where}) for {age:.0f} s (bound {stale_after_s:.0f} s)"


def release(instance: DagsterInstance, run_id: str, reason: str) -> None:
    """Mark the run failed (if it is not finished) with `reason`, tag it released, and free its pool slots."""
    record = instance.get_run_record_by_id(run_id)
    if record is None:
        return
    if record.dagster_run.status in NOT_FINISHED:
        instance.report_run_failed(
            record.dagster_run, f"tda released this run: {reason}; its queries are pending again"
        )
        instance.add_run_tags(run_id, {RELEASED_TAG: reason})
    instance.event_log_storage.free_concurrency_slots_for_run(run_id)


def release_dead_runs(instance: DagsterInstance, stale_after_s: float, log: Callable[[str], None] = print) -> list[str]:
    """Release every unfinished run whose process is gone, then free the slots finished runs still hold; returns the
    run ids released. Slots are instance-wide, so this looks at every storage root's runs."""
    host, now, released = socket.gethostname(), time.time(), []
    for record in instance.get_run_records(RunsFilter(statuses=NOT_FINISHED)):
        reason = dead_reason(record.dagster_run.tags, host, now, stale_after_s)
        if reason:
            release(instance, record.dagster_run.run_id, f"{reason} (found by pid {os.getpid()} on {host})")
            log(
                f"==> released run {record.dagster_run.run_id}: {reason}; its slots are free, its queries pending again"
            )
            released.append(record.dagster_run.run_id)
    free_finished_holders(instance)
    return released


def free_finished_holders(instance: DagsterInstance) -> list[str]:
    """Free the pool slots (and queued claims) of finished or deleted runs; returns their run ids."""
    event_log = instance.event_log_storage
    if not event_log.supports_global_concurrency_limits:
        return []
    holders = event_log.get_concurrency_run_ids() | {
        slot.run_id
        for info in event_log.get_concurrency_infos(sorted(event_log.get_concurrency_keys())).values()
        for slot in info.claimed_slots
    }
    if not holders:
        return []
    unfinished = {
        r.dagster_run.run_id
        for r in instance.get_run_records(RunsFilter(run_ids=sorted(holders)))
        if r.dagster_run.status in NOT_FINISHED
    }
    finished = sorted(holders - unfinished)  # a deleted run's slots too
    for run_id in finished:
        event_log.free_concurrency_slots_for_run(run_id)
    return finished
