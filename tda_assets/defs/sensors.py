"""The query inbox sensor: each tick, every inbox query without a result in the storage root gets its runs.

A query is pending when the root holds no attribution of it under the default configuration (DESIGN §2): a new root,
a failed or interrupted run, all count, whatever partitions the instance already has. Its clip run
(`query_clip`, partition `query`) comes first; its attribution run (`attribute_config`, partition
`query|default`) follows on a later tick, once the clip is in the root. Runs in progress are not requested twice; a
run that failed `MAX_ATTEMPTS` times in this root is given up with a warning. Each tick first releases the runs whose
process is gone (`run_health`): their queries are pending again, and a released run is no failed attempt.
"""

from __future__ import annotations

from collections import Counter, defaultdict

from dagster import (
    AddDynamicPartitionsRequest,
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
from resources.env import Env
from tda_assets.data.inbox import inbox_files, judge_query
from tda_assets.data.query_state import DEFAULT_CONFIG, MIN_QUERY_LOSS_RATIO, STEP_TAG, partition_tag, pending_queries
from tda_assets.defs.configs import UNLEARNING_ASSETS
from tda_assets.defs.partitions import configs, queries, query_config_key, query_configs
from tda_assets.defs.query_runs import IN_PROGRESS, run_tags, runs_of_root
from tda_assets.defs.run_health import RELEASED_TAG, release_dead_runs
from tda_assets.attribution.similarity import EMBEDDINGS
from tda_assets.io.checkpoints import read_checkpoint_record
from tda_assets.io.registry import entry, key
from tda_assets.io.slugs import check_query_id
from tda_assets.io.storage import Storage
from tda_assets.io.tables import list_keys

CLIP_ASSETS = ("query_clips", "similarity_scores")
QUERY_ASSETS = (*CLIP_ASSETS, *UNLEARNING_ASSETS)
MAX_ATTEMPTS = 2

query_clip_job = define_asset_job(
    "query_clip",
    selection=AssetSelection.assets(*(AssetKey(n) for n in CLIP_ASSETS)),
    partitions_def=queries,
    description="The query's clip (generated from its prompt, or the user's clip) and its similarity attribution.",
)
attribute_config_job = define_asset_job(
    "attribute_config",
    selection=AssetSelection.assets(*(AssetKey(n) for n in UNLEARNING_ASSETS)),
    partitions_def=query_configs,
    description="One query under one configuration: unlearn it, re-measure every training item, score the "
    "attributions.",
)


def _steps_of_runs(
    context: SensorEvaluationContext, statuses: list[DagsterRunStatus], root: str, attempts_only: bool = False
) -> list[tuple[str, str]]:
    """`(step, partition)` of the root's query runs in `statuses` (with `attempts_only`, not those released because
    their process was killed or stopped: that is no failure of the query)."""
    runs = [t for t in runs_of_root(context.instance, statuses, root) if not (attempts_only and RELEASED_TAG in t)]
    return [(t.get(STEP_TAG, ""), t.get(partition_tag(), "")) for t in runs]


def _with_similarity(store: Storage) -> set[str]:
    """The queries whose clip run wrote the similarity scores of every embedding, its last output: a clip run killed
    after writing the clip but before these is run again."""
    methods, found = {f"similarity:{name}" for name in EMBEDDINGS}, defaultdict(set)
    for k in list_keys(store, "similarity_scores"):
        found[k["query_id"]].add(k["method"])
    return {qid for qid, have in found.items() if methods <= have}


def query_of(request: RunRequest) -> str:
    """The query a run request of the sensor is for."""
    if request.job_name == query_clip_job.name:
        return str(request.partition_key)
    return query_configs.get_partition_key_from_str(str(request.partition_key)).keys_by_dimension["query"]


def valid_query_ids(context: SensorEvaluationContext, store: Storage, files: dict[str, str]) -> list[str]:
    """The inbox's query ids that are valid ids; a file with a bad one is logged (rename it) and skipped."""
    valid = []
    for query_id in sorted(files):
        try:
            valid.append(check_query_id(query_id))
        except ValueError as exc:
            context.log.warning(f"inbox file skipped: {store.uri(files[query_id])}: {exc}; rename the file")
    return valid


def wanted_runs(store: Storage, query_ids: list[str], protocol_id: str) -> list[tuple[str, str, str]]:
    """`(step, query, partition)` of every run the pending queries need (pending: no `QueryState.is_result` under the
    default configuration): a clip run for those without a clip (or whose clip run stopped before the similarity
    scores), else an attribution run of the default configuration."""
    record = read_checkpoint_record(store)
    no_clip, no_attribution = pending_queries(store, query_ids, record.checkpoint_id, protocol_id, MIN_QUERY_LOSS_RATIO)
    done = _with_similarity(store)
    unfinished = [q for q in no_attribution if q not in done]  # its clip run was killed between clip and similarity
    no_clip, no_attribution = sorted(no_clip + unfinished), [q for q in no_attribution if q not in unfinished]
    return [("clip", q, q) for q in no_clip] + [
        ("attribute", q, query_config_key(q, DEFAULT_CONFIG)) for q in no_attribution
    ]


def _judged_valid(context: SensorEvaluationContext, store: Storage, path: str, roots: list[str]) -> bool:
    """Whether a query file passes `judge_query` when its clip is due; a bad one is logged and skipped until fixed."""
    try:
        judge_query(store, path, roots)
        return True
    except (ValueError, FileNotFoundError) as exc:
        context.log.warning(f"inbox file skipped: {exc}")
        return False


def run_requests(
    context: SensorEvaluationContext,
    store: Storage,
    inbox: InboxResource,
    files: dict[str, str],
    roots: list[str],
    wanted: list[tuple[str, str, str]],
) -> list[RunRequest]:
    """The tick's requests among `wanted`: none in flight, none failed `MAX_ATTEMPTS` times, at most
    `max_queries_per_tick`, a clip run's query file judged first."""
    in_flight = set(_steps_of_runs(context, IN_PROGRESS, store.url))
    attempts = Counter(_steps_of_runs(context, [DagsterRunStatus.FAILURE], store.url, attempts_only=True))
    jobs = {"clip": query_clip_job.name, "attribute": attribute_config_job.name}
    batch, more = [], 0
    for step, qid, partition in wanted:
        if (step, str(partition)) in in_flight:
            continue
        if attempts[(step, str(partition))] >= MAX_ATTEMPTS:
            context.log.warning(
                f"query {qid}: its {step} run failed {MAX_ATTEMPTS} times in this storage root; not requested "
                "again (see its runs; fix the query, then re-add it with another id or `tda attribute`)"
            )
            continue
        if len(batch) == inbox.max_queries_per_tick:
            more += 1  # judged on a later tick: a tick reads the files of the queries it requests, not of every one
            continue
        if step == "clip" and not _judged_valid(context, store, files[qid], roots):
            continue
        batch.append(RunRequest(job_name=jobs[step], partition_key=partition, tags=run_tags(step, store.url)))
    if more:
        context.log.info(f"{more} more query runs wait for the next tick")
    return batch


def partition_requests(context: SensorEvaluationContext, batch: list[RunRequest]) -> list[AddDynamicPartitionsRequest]:
    """Adds the partitions the instance lacks: the requested queries', and the default configuration's."""
    known = set(context.instance.get_dynamic_partitions(queries.name))
    new_queries = sorted({query_of(r) for r in batch} - known)
    requests = [queries.build_add_request(new_queries)] if new_queries else []
    if DEFAULT_CONFIG not in context.instance.get_dynamic_partitions(configs.name):
        requests.append(configs.build_add_request([DEFAULT_CONFIG]))
    return requests


@sensor(
    jobs=[query_clip_job, attribute_config_job], minimum_interval_seconds=30, default_status=DefaultSensorStatus.RUNNING
)
def query_inbox_sensor(
    context: SensorEvaluationContext, storage: StorageResource, inbox: InboxResource, protocol: LossProtocolResource
) -> SensorResult | SkipReason:
    """Requests the runs of every pending inbox query (at most `max_queries_per_tick` per tick)."""
    store = storage.storage()
    release_dead_runs(context.instance, Env.read().run_stale_s, context.log.warning)  # a killed command's runs
    roots = inbox.allowed_roots(store)  # a bad TDA_ALLOWED_AUDIO_ROOTS fails the tick, naming it
    files = inbox_files(store)
    valid = valid_query_ids(context, store, files)
    if not valid:
        return SkipReason(f"the inbox {store.uri(entry('inbox').glob())} has no query files")
    if not store.exists(key("checkpoint_record")):
        return SkipReason("no checkpoint in the storage root yet: run `tda prepare` (or materialize the training side)")
    wanted = wanted_runs(store, valid, protocol.protocol().protocol_id)
    batch = run_requests(context, store, inbox, files, roots, wanted)
    return SensorResult(run_requests=batch, dynamic_partitions_requests=partition_requests(context, batch))
