"""The runs of queries on an instance: their tags, and which ones a storage root has in progress or failed.

Imports Dagster, the tag names and the dead-run judgement only, so the sensor, the Runner and the fast `tda queries`
share it.
"""

from __future__ import annotations

import socket
import time

from dagster import DagsterInstance, DagsterRunStatus, RunsFilter

from resources.env import Env
from tda_assets.data.query_state import STEP_TAG, STORAGE_TAG
from tda_assets.defs.run_health import NOT_FINISHED, dead_reason

IN_PROGRESS = [
    DagsterRunStatus.QUEUED,
    DagsterRunStatus.NOT_STARTED,
    DagsterRunStatus.STARTING,
    DagsterRunStatus.STARTED,
]


def run_tags(step: str, root_url: str) -> dict[str, str]:
    """Tags of a query run: what it does (`clip` or `attribute`) and in which storage root."""
    return {STEP_TAG: step, STORAGE_TAG: root_url}


def runs_of_root(instance: DagsterInstance, statuses: list[DagsterRunStatus], root_url: str) -> list[dict[str, str]]:
    """The tags of every query run of `root_url` in one of `statuses`; an unfinished run whose process is gone
    (`run_health.dead_reason`; another host's after TDA_RUN_STALE_S without heartbeat) is not counted as in progress."""
    records = instance.get_run_records(RunsFilter(statuses=statuses, tags={STORAGE_TAG: root_url}))
    host, now, stale_after_s = socket.gethostname(), time.time(), Env.read().run_stale_s
    return [
        dict(r.dagster_run.tags)
        for r in records
        if r.dagster_run.status not in NOT_FINISHED or dead_reason(r.dagster_run.tags, host, now, stale_after_s) is None
    ]
