"""A run of a command, supervised: it executes in a worker thread while the command's main thread keeps its heartbeat,
watches its steps that wait for a pool slot (who holds it, every `LOG_EVERY_S`; given up after `slot_wait_s`), and
answers SIGTERM and SIGINT within seconds: the run is marked failed with the cause, its slots freed, the command stops.

In the main thread Dagster's in-process executor replaces the SIGINT/SIGTERM handlers with ones that only set a flag,
and its wait for a pool slot never looks at that flag: a command waiting there could be stopped by SIGKILL only.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import sys
import threading
import time
import traceback
from contextlib import contextmanager
from datetime import datetime, timezone
from typing import Callable, Iterator, TypeVar

from dagster import DagsterExecutionInterruptedError, DagsterInstance, RunsFilter

from tda_assets.defs.run_health import HEARTBEAT_S, HEARTBEAT_TAG, LAUNCH_TAG, NOT_FINISHED, dead_reason, release

T = TypeVar("T")
POLL_S = 1.0  # how often the main thread looks at the run
LOG_EVERY_S = 30  # how often a step waiting for a pool slot says who holds it
GRACE_S = 5.0  # how long a stopped run's thread may take to unwind before the command goes on without it


class CommandStopped(KeyboardInterrupt):
    """SIGTERM or SIGINT reached a command: its run (if any) was marked failed and its slots freed."""

    def __init__(self, signum: int):
        self.signum = signum
        super().__init__(f"stopped by {signal.Signals(signum).name}")


class SlotWaitTimeout(RuntimeError):
    """A step waited longer than the stated bound for a pool slot; the message names the holder and the fix."""


@contextmanager
def stop_on_signals() -> Iterator[None]:
    """Within: SIGTERM and SIGINT raise `CommandStopped` in the main thread (a supervised run then stops within
    seconds); the previous handlers after."""
    signals = (signal.SIGTERM, signal.SIGINT)

    def handler(signum, _frame):
        for other in signals:  # a second signal must not cut the run's release short
            signal.signal(other, signal.SIG_IGN)
        raise CommandStopped(signum)

    before = {signum: signal.signal(signum, handler) for signum in signals}
    try:
        yield
    finally:
        for signum, previous in before.items():
            signal.signal(signum, previous)


def _at(timestamp: datetime | float | None) -> str:
    if timestamp is None:
        return "?"
    when = timestamp if isinstance(timestamp, datetime) else datetime.fromtimestamp(timestamp, timezone.utc)
    return when.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _raise_in(thread: threading.Thread, exc_type: type[BaseException]) -> None:
    """Raise `exc_type` in `thread` at its next Python instruction (CPython's PyThreadState_SetAsyncExc)."""
    if thread.ident is not None and thread.is_alive():
        ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread.ident), ctypes.py_object(exc_type))


class Watch:
    """What the main thread knows of the run its worker executes: its id once Dagster made it, heartbeat, waits."""

    def __init__(
        self,
        instance: DagsterInstance,
        launch_id: str,
        log: Callable[[str], None],
        slot_wait_s: float,
        stale_after_s: float,
    ):
        self.instance, self.launch_id, self.log = instance, launch_id, log
        self.slot_wait_s, self.stale_after_s = slot_wait_s, stale_after_s
        self.run_id: str | None = None
        self.beat = time.time()
        self.logged_at = 0.0

    def find_run(self) -> str | None:
        if self.run_id is None:
            records = self.instance.get_run_records(RunsFilter(tags={LAUNCH_TAG: self.launch_id}), limit=1)
            self.run_id = records[0].dagster_run.run_id if records else None
        return self.run_id

    def poll(self) -> None:
        """Heartbeat, and the slot waits of the run: logged with their holder, raised past the bound."""
        if self.find_run() is None:
            return
        now = time.time()
        if now - self.beat >= HEARTBEAT_S:
            self.instance.add_run_tags(self.run_id, {HEARTBEAT_TAG: str(int(now))})
            self.beat = now
        for pool, step, since, holders in self.waits():
            waited = now - since.timestamp()
            held = "; ".join(self.describe(*h) for h in holders) or "no run (the pool's limit is 0)"
            if waited > self.slot_wait_s:
                raise SlotWaitTimeout(
                    f"step {step} of run {self.run_id} waited {waited:.0f} s "
                    f"(bound TDA_SLOT_WAIT_S={self.slot_wait_s:.0f}) "
                    f"for a slot of pool {pool!r}, held by {held}: let that run finish, stop its process (its run is "
                    f"then released on the next command), or give the pool more slots with "
                    f"`dagster instance concurrency set {pool} <N>`"
                )
            if now - self.logged_at >= LOG_EVERY_S:
                self.log(
                    f"    step {step} waits for a slot of pool {pool!r} since {_at(since)} ({waited:.0f} s): "
                    f"held by {held}"
                )
                self.logged_at = now

    def waits(self) -> list[tuple[str, str, datetime, list[tuple[str, str, datetime | None]]]]:
        """`(pool, step, waiting since, [(holder run, holder step, holding since)])` of this run's unassigned claims;
        a holder whose process is gone is released on the spot."""
        event_log = self.instance.event_log_storage
        if not event_log.supports_global_concurrency_limits:
            return []
        out = []
        for pool, info in event_log.get_concurrency_infos(sorted(event_log.get_concurrency_keys())).items():
            mine = [p for p in info.pending_steps if p.run_id == self.run_id and p.assigned_timestamp is None]
            if not mine:
                continue
            assigned = {(p.run_id, p.step_key): p.assigned_timestamp for p in info.pending_steps}
            holders = [(s.run_id, s.step_key, assigned.get((s.run_id, s.step_key))) for s in info.claimed_slots]
            if self.release_dead(holders):
                continue  # the slot is free now: Dagster's next claim takes it
            out += [(pool, p.step_key, p.enqueued_timestamp, holders) for p in mine]
        return out

    def release_dead(self, holders: list[tuple[str, str, datetime | None]]) -> bool:
        released = False
        for run_id, _step, _since in holders:
            record = self.instance.get_run_record_by_id(run_id)
            if record is None or record.dagster_run.status not in NOT_FINISHED:
                self.instance.event_log_storage.free_concurrency_slots_for_run(run_id)
                released = True
                continue
            reason = dead_reason(record.dagster_run.tags, socket.gethostname(), time.time(), self.stale_after_s)
            if reason:
                release(self.instance, run_id, reason)
                self.log(f"    released run {run_id}, which held a slot: {reason}")
                released = True
        return released

    def describe(self, run_id: str, step: str, since: datetime | None) -> str:
        record = self.instance.get_run_record_by_id(run_id)
        tags = record.dagster_run.tags if record else {}
        where = f", pid {tags['tda/pid']} on {tags.get('tda/host', '?')}" if "tda/pid" in tags else ""
        return f"run {run_id} (step {step}, since {_at(since)}{where})"


def supervised(
    instance: DagsterInstance,
    launch_id: str,
    execute: Callable[[], T],
    log: Callable[[str], None],
    slot_wait_s: float,
    stale_after_s: float,
) -> T:
    """`execute()` (which launches one run tagged `tda/launch = launch_id`) in a worker thread, supervised from here.

    On SIGTERM/SIGINT (`CommandStopped`, or a plain KeyboardInterrupt) or a slot wait past `slot_wait_s`: the run is
    marked failed with the cause and tagged released (its queries are pending again), the worker interrupted, its
    slots freed, and the exception raised here.
    """
    box: dict[str, object] = {}

    def work() -> None:
        try:
            box["result"] = execute()
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread
            box["error"] = exc

    worker = threading.Thread(target=work, name=f"tda-run-{launch_id[:8]}", daemon=True)
    watch = Watch(instance, launch_id, log, slot_wait_s, stale_after_s)
    worker.start()
    try:
        seen: set[str] = set()
        while worker.is_alive():
            worker.join(POLL_S)
            try:
                if worker.is_alive():
                    watch.poll()
            except Exception as exc:  # noqa: BLE001 - the watch failing (a database hiccup) does not stop the run
                if isinstance(exc, SlotWaitTimeout):
                    raise
                if str(exc) not in seen:
                    seen.add(str(exc))
                    log(f"    watching run {watch.run_id}: {type(exc).__name__}: {exc} (the run goes on)")
    except BaseException as stop:
        named = isinstance(stop, (CommandStopped, SlotWaitTimeout))
        cause = str(stop) if named else f"stopped by {type(stop).__name__}"
        _stop(watch, worker, f"{cause} (process {os.getpid()} on {socket.gethostname()})")
        raise
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box["result"]  # type: ignore[return-value]


def _stop(watch: Watch, worker: threading.Thread, reason: str) -> None:
    """Fail the run with `reason` (before its worker's own failure event, so the cause is the one recorded), interrupt
    the worker, wait `GRACE_S` for it, then fail the run if Dagster made it meanwhile and free its slots."""
    if watch.find_run():
        release(watch.instance, watch.run_id, reason)
    _raise_in(worker, DagsterExecutionInterruptedError)
    worker.join(GRACE_S)
    if worker.is_alive():
        frame = sys._current_frames().get(worker.ident)
        where = "".join(traceback.format_stack(frame)[-3:]) if frame else "?"
        watch.log(
            f"    the run's thread did not stop within {GRACE_S:.0f} s; the command ends without it. "
            f"It was at:\n{where}"
        )
    if watch.find_run():
        release(watch.instance, watch.run_id, reason)
