"""The query inbox sensor: each tick, every inbox query without a result in the storage root gets its runs.

A query is pending when the root holds no attribution of it under the default configuration (DESIGN §2): a new root,
a failed or interrupted run, all count, whatever partitions the instance already has. Its clip run
(`query_clip`, partition `query`) comes first; its attribution run (`attribute_config`, partition
`query|default`) follows on a later tick, once the clip is in the root. Runs in progress are not requested twice; a
run that failed `MAX_ATTEMPTS` times in this root is given up with a warning.
"""

from __future__ import annotations

from dagster import (
    AssetKey,
    AssetSelection,
    DagsterRunStatus,
    DefaultSensorStatus,
    RunRequest,
    SensorEvaluationContext,
    SensorResult,
    SkipReason,
    define_asset_job,
    sensor,
)

from resources import InboxResource, LossProtocolResource, StorageResource
from tda_assets.data.inbox import inbox_files, read_query_file
from tda_assets.data.query_state import DEFAULT_CONFIG, MIN_QUERY_LOSS_RATIO, STEP_TAG, pending_queries
from tda_assets.defs.configs import UNLEARNING_ASSETS
from tda_assets.defs.partitions import configs, queries, query_config_key, query_configs
from tda_assets.defs.query_runs import IN_PROGRESS, run_tags, runs_of_root
from tda_assets.io.checkpoints import read_checkpoint_record
from tda_assets.io.registry import entry, key
from tda_assets.io.slugs import check_query_id

CLIP_ASSETS = ("query_clips", "similarity_scores")
QUERY_ASSETS = (*CLIP_ASSETS, *UNLEARNING_ASSETS)
MAX_ATTEMPTS = 2

query_clip_job = define_asset_job(
    "query_clip", selection=AssetSelection.assets(*(AssetKey(n) for n in CLIP_ASSETS)), partitions_def=queries,
    description="The query's clip (generated from its prompt, or the user's clip) and its similarity attribution.",
)
attribute_config_job = define_asset_job(
    "attribute_config", selection=AssetSelection.assets(*(AssetKey(n) for n in UNLEARNING_ASSETS)), partitions_def=query_configs,
    description="One query under one configuration: unlearn it, re-measure every training item, score the attributions.",
)


def _steps_of_runs(context: SensorEvaluationContext, statuses: list[DagsterRunStatus], root: str) -> list[tuple[str, str]]:
    """`(step, partition)` of the root's query runs in `statuses`."""
    return [(t.get(STEP_TAG, ""), t.get("dagster/partition", "")) for t in runs_of_root(context.instance, statuses, root)]


def query_of(request: RunRequest) -> str:
    """The query a run request of the sensor is for."""
    if request.job_name == query_clip_job.name:
        return str(request.partition_key)
    return query_configs.get_partition_key_from_str(str(request.partition_key)).keys_by_dimension["query"]


@sensor(jobs=[query_clip_job, attribute_config_job], minimum_interval_seconds=30, default_status=DefaultSensorStatus.RUNNING)
def query_inbox_sensor(
    context: SensorEvaluationContext, storage: StorageResource, inbox: InboxResource, protocol: LossProtocolResource
) -> SensorResult | SkipReason:
    """Requests the runs of every pending inbox query (at most `max_queries_per_tick` per tick)."""
    store, roots = storage.storage(), inbox.audio_roots()  # a bad TDA_ALLOWED_AUDIO_ROOTS fails the tick, naming it
    files, valid = inbox_files(store), []
    for query_id in sorted(files):
        try:
            valid.append(check_query_id(query_id))
        except ValueError as exc:
            context.log.warning(f"inbox file skipped: {store.uri(files[query_id])}: {exc}; rename the file")
    if not valid:
        return SkipReason(f"the inbox {store.uri(entry('inbox').glob())} has no query files")
    if not store.exists(key("checkpoint_record")):
        return SkipReason("no checkpoint in the storage root yet: run `tda prepare` (or materialize the training side)")
    record = read_checkpoint_record(store)
    no_clip, no_attribution = pending_queries(store, valid, record.checkpoint_id, protocol.protocol().protocol_id,
                                              MIN_QUERY_LOSS_RATIO)
    checked = []
    for qid in no_clip:  # a query file is read when its clip is due: a bad one is skipped (and logged) every tick until fixed
        try:
            read_query_file(store, files[qid], roots)
            checked.append(qid)
        except (ValueError, FileNotFoundError) as exc:
            context.log.warning(f"inbox file skipped: {exc}")
    no_clip = checked
    in_flight = set(_steps_of_runs(context, IN_PROGRESS, store.url))
    failures = _steps_of_runs(context, [DagsterRunStatus.FAILURE], store.url)
    wanted = [("clip", q, q) for q in no_clip] + [("attribute", q, query_config_key(q, DEFAULT_CONFIG)) for q in no_attribution]
    jobs = {"clip": query_clip_job.name, "attribute": attribute_config_job.name}
    requests = []
    for step, qid, partition in wanted:
        if (step, str(partition)) in in_flight:
            continue
        if failures.count((step, str(partition))) >= MAX_ATTEMPTS:
            context.log.warning(f"query {qid}: its {step} run failed {MAX_ATTEMPTS} times in this storage root; not requested "
                                "again (see its runs; fix the query, then re-add it with another id or `tda attribute`)")
            continue
        requests.append(RunRequest(job_name=jobs[step], partition_key=partition, tags=run_tags(step, store.url)))
    batch = requests[:inbox.max_queries_per_tick]
    if len(requests) > len(batch):
        context.log.info(f"{len(requests) - len(batch)} more query runs wait for the next tick")
    known = set(context.instance.get_dynamic_partitions(queries.name))
    new_queries = sorted({query_of(r) for r in batch} - known)
    partition_requests = [queries.build_add_request(new_queries)] if new_queries else []
    if DEFAULT_CONFIG not in context.instance.get_dynamic_partitions(configs.name):
        partition_requests.append(configs.build_add_request([DEFAULT_CONFIG]))
    return SensorResult(run_requests=batch, dynamic_partitions_requests=partition_requests)
