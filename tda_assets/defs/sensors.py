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
from tda_assets.data.inbox import inbox_files
from tda_assets.defs.partitions import queries
from tda_assets.io.slugs import check_query_id

QUERY_ASSETS = ("query_clips", "unlearned_model", "unlearned_losses", "attribution_scores", "similarity_scores")

attribute_query_job = define_asset_job(
    "attribute_query",
    selection=AssetSelection.assets(*(AssetKey(name) for name in QUERY_ASSETS)),
    partitions_def=queries,
    description="Generate the query clip, unlearn it, re-measure every training item, and score the attributions.",
)


@sensor(job=attribute_query_job, minimum_interval_seconds=30, default_status=DefaultSensorStatus.RUNNING)
def query_inbox_sensor(context: SensorEvaluationContext, storage: StorageResource, inbox: InboxResource) -> SensorResult:
    """Adds new inbox queries as partitions and requests their runs (at most `max_queries_per_tick` per tick)."""
    known = set(context.instance.get_dynamic_partitions(queries.name))
    new, skipped = [], []
    for query_id in sorted(inbox_files(storage.storage())):
        try:
            check_query_id(query_id)
        except ValueError as exc:
            skipped.append(str(exc))
            continue
        if query_id not in known:
            new.append(query_id)
    for message in skipped:
        context.log.warning(f"inbox file ignored: {message}")
    batch = new[:inbox.max_queries_per_tick]
    if len(new) > len(batch):
        context.log.info(f"{len(new) - len(batch)} more queries wait for the next tick")
    return SensorResult(
        run_requests=[RunRequest(partition_key=q, run_key=f"query:{q}") for q in batch],
        dynamic_partitions_requests=[queries.build_add_request(batch)] if batch else [],
    )
