"""The runs of queries on an instance: their tags, and which ones a storage root has in progress or failed.

Imports Dagster and the tag names only, so the sensor, the Runner and the fast `tda queries` share it.
"""

from __future__ import annotations

from dagster import DagsterInstance, DagsterRunStatus, RunsFilter

from tda_assets.data.query_state import STEP_TAG, STORAGE_TAG

IN_PROGRESS = [DagsterRunStatus.QUEUED, DagsterRunStatus.NOT_STARTED, DagsterRunStatus.STARTING, DagsterRunStatus.STARTED]


def run_tags(step: str, storage_root: str) -> dict[str, str]:
    """Tags of a query run: what it does (`clip` or `attribute`) and in which storage root."""
    return {STEP_TAG: step, STORAGE_TAG: storage_root}


def runs_of_root(instance: DagsterInstance, statuses: list[DagsterRunStatus], storage_root: str) -> list[dict[str, str]]:
    """The tags of every query run of `storage_root` in one of `statuses`."""
    records = instance.get_run_records(RunsFilter(statuses=statuses, tags={STORAGE_TAG: storage_root}))
    return [dict(r.dagster_run.tags) for r in records]
