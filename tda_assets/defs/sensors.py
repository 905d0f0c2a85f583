"""The query inbox sensor: new query files become `queries` partitions and runs, in one tick."""

from dagster import (
    AssetKey,
    AssetSelection,
    DefaultSensorStatus,
    RunRequest,
    SensorEvaluationContext,
    SensorResult,
    define_asset_job,
    sensor,
)

from resources import InboxResource, StorageResource
from tda_assets.data.inbox import inbox_files, read_query_file
from tda_assets.defs.partitions import queries

QUERY_ASSETS = ("query_clips", "unlearned_model", "unlearned_losses", "attribution_scores", "similarity_scores")

attribute_query_job = define_asset_job(
    "attribute_query",
    selection=AssetSelection.assets(*(AssetKey(name) for name in QUERY_ASSETS)),
    partitions_def=queries,
    description="Generate the query clip, unlearn it, re-measure every training item, and score the attributions.",
)


@sensor(job=attribute_query_job, minimum_interval_seconds=30, default_status=DefaultSensorStatus.RUNNING)
def query_inbox_sensor(context: SensorEvaluationContext, storage: StorageResource, inbox: InboxResource) -> SensorResult:
    """Adds new inbox queries as partitions and requests their runs (at most `max_queries_per_tick`); logs and skips bad files."""
    store, roots = storage.storage(), inbox.audio_roots()  # a bad TDA_ALLOWED_AUDIO_ROOTS fails the tick, naming it
    known = set(context.instance.get_dynamic_partitions(queries.name))
    waiting = sorted((q, path) for q, path in inbox_files(store).items() if q not in known)
    batch: list[str] = []
    for n, (query_id, path) in enumerate(waiting):
        if len(batch) == inbox.max_queries_per_tick:
            context.log.info(f"{len(waiting) - n} more inbox files wait for the next tick")
            break
        try:  # a bad file is logged and skipped (every tick, until it is fixed or removed); the others still run
            read_query_file(store, path, roots)
        except (ValueError, FileNotFoundError) as exc:
            context.log.warning(f"inbox file skipped: {exc}")
            continue
        batch.append(query_id)
    return SensorResult(
        run_requests=[RunRequest(partition_key=q, run_key=f"query:{q}") for q in batch],
        dynamic_partitions_requests=[queries.build_add_request(batch)] if batch else [],
    )
