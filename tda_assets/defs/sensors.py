"""The query inbox sensor: each tick, every inbox query without a result in the storage root gets its runs.

A query is pending when the root holds no attribution of it under the default configuration (DESIGN §2): a new root,
a failed or interrupted run, all count, whatever partitions the instance already has. Its clip run
(`query_clip`, partition `query`) comes first; its attribution run (`attribute_config`, partition
`query|default`) follows on a later tick, once the clip is in the root. Runs in progress are not requested twice; a
run that failed `MAX_ATTEMPTS` times in this root is given up with a warning. Each tick first releases the runs whose
process is gone (`run_health`): their queries are pending again, and a released run is no failed attempt.

Past the partition budget (`InboxResource.max_query_partitions`, TDA_MAX_QUERY_PARTITIONS), a pending query without a
`queries` partition gets none: the tick groups such queries, sorted, into batches of `queries_per_batch`
(`data/query_batches.py`: the same ids make the same `batch-<digest>` partition of `query_batches`) and requests one
`attribute_batch` run per batch, which runs each query's steps (clip, similarity, unlearning, losses, scores). A query
of a batch in flight is not batched again; a failed batch run counts as an attempt of each query it held that is still
pending, given up after `MAX_ATTEMPTS` as with a query's own runs. Per-query and batch runs share the tick's
`max_queries_per_tick` runs.
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
from tda_assets.data.query_batches import QUERIES_TAG, batch_tag, queries_of_tag, write_batch
from tda_assets.data.query_state import DEFAULT_CONFIG, MIN_QUERY_LOSS_RATIO, STEP_TAG, partition_tag, pending_queries
from tda_assets.defs.configs import UNLEARNING_ASSETS
from tda_assets.defs.partitions import configs, queries, query_batches, query_config_key, query_configs
from tda_assets.defs.query_runs import IN_PROGRESS, run_tags, runs_of_root
from tda_assets.defs.run_health import RELEASED_TAG, release_dead_runs
from tda_assets.attribution.similarity import EMBEDDINGS
from tda_assets.io.checkpoints import read_checkpoint_record
from tda_assets.io.registry import entry, key
from tda_assets.io.slugs import check_query_id
from tda_assets.io.storage import Storage
from tda_assets.io.tables import list_keys

CLIP_ASSETS = ("query_clips", "similarity_scores")
BATCH_ASSETS = ("query_batch",)
BATCH_STEP = "batch"  # the STEP_TAG of a batch run (a query's own runs: `clip`, `attribute`)
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
query_batch_job = define_asset_job(
    "attribute_batch",
    selection=AssetSelection.assets(*(AssetKey(n) for n in BATCH_ASSETS)),
    partitions_def=query_batches,
    description="Queries past the partition budget, one batch: each query's clip, similarity and default attribution.",
)


def _steps_of_runs(
    context: SensorEvaluationContext, statuses: list[DagsterRunStatus], root_url: str, attempts_only: bool = False
) -> list[tuple[str, str]]:
    """`(step, partition)` of the root's query runs in `statuses` (with `attempts_only`, not those released because
    their process was killed or stopped: that is no failure of the query)."""
    runs = [t for t in runs_of_root(context.instance, statuses, root_url) if not (attempts_only and RELEASED_TAG in t)]
    return [(t.get(STEP_TAG, ""), t.get(partition_tag(), "")) for t in runs]


def _with_similarity(root: Storage) -> set[str]:
    """The queries whose clip run wrote the similarity scores of every embedding, its last output: a clip run killed
    after writing the clip but before these is run again."""
    methods, found = {f"similarity:{name}" for name in EMBEDDINGS}, defaultdict(set)
    for k in list_keys(root, "similarity_scores"):
        found[k["query_id"]].add(k["method"])
    return {qid for qid, have in found.items() if methods <= have}


def query_of(request: RunRequest) -> str:
    """The query a run request of the sensor is for (a batch's: its partition key)."""
    if request.job_name in (query_clip_job.name, query_batch_job.name):
        return str(request.partition_key)
    return query_configs.get_partition_key_from_str(str(request.partition_key)).keys_by_dimension["query"]


def queries_of(request: RunRequest) -> list[str]:
    """Every query a run request of the sensor is for: a batch's queries, else its one query."""
    if request.job_name == query_batch_job.name:
        return queries_of_tag(request.tags[QUERIES_TAG])
    return [query_of(request)]


def valid_query_ids(context: SensorEvaluationContext, root: Storage, files: dict[str, str]) -> list[str]:
    """The inbox's query ids that are valid ids; a file with a bad one is logged (rename it) and skipped."""
    valid = []
    for query_id in sorted(files):
        try:
            valid.append(check_query_id(query_id))
        except ValueError as exc:
            context.log.warning(f"inbox file skipped: {root.uri(files[query_id])}: {exc}; rename the file")
    return valid


def wanted_runs(root: Storage, query_ids: list[str], protocol_id: str) -> list[tuple[str, str, str]]:
    """`(step, query, partition)` of every run the pending queries need (pending: no `QueryState.is_result` under the
    default configuration): a clip run for those without a clip (or whose clip run stopped before the similarity
    scores), else an attribution run of the default configuration."""
    record = read_checkpoint_record(root)
    no_clip, no_attribution = pending_queries(root, query_ids, record.checkpoint_id, protocol_id, MIN_QUERY_LOSS_RATIO)
    done = _with_similarity(root)
    unfinished = [q for q in no_attribution if q not in done]  # its clip run was killed between clip and similarity
    no_clip, no_attribution = sorted(no_clip + unfinished), [q for q in no_attribution if q not in unfinished]
    return [("clip", q, q) for q in no_clip] + [
        ("attribute", q, query_config_key(q, DEFAULT_CONFIG)) for q in no_attribution
    ]


def _judged_valid(context: SensorEvaluationContext, root: Storage, path: str, roots: list[str]) -> bool:
    """Whether a query file passes `judge_query` when its clip is due; a bad one is logged and skipped until fixed."""
    try:
        judge_query(root, path, roots)
        return True
    except (ValueError, FileNotFoundError) as exc:
        context.log.warning(f"inbox file skipped: {exc}")
        return False


def run_requests(
    context: SensorEvaluationContext,
    root: Storage,
    inbox: InboxResource,
    files: dict[str, str],
    roots: list[str],
    wanted: list[tuple[str, str, str]],
) -> list[RunRequest]:
    """The tick's requests among `wanted`: none in flight, none failed `MAX_ATTEMPTS` times, at most
    `max_queries_per_tick`, a clip run's query file judged first."""
    in_flight = set(_steps_of_runs(context, IN_PROGRESS, root.url))
    attempts = Counter(_steps_of_runs(context, [DagsterRunStatus.FAILURE], root.url, attempts_only=True))
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
        if step == "clip" and not _judged_valid(context, root, files[qid], roots):
            continue
        batch.append(RunRequest(job_name=jobs[step], partition_key=partition, tags=run_tags(step, root.url)))
    if more:
        context.log.info(f"{more} more query runs wait for the next tick")
    return batch


def split_by_budget(
    wanted: list[tuple[str, str, str]], known: set[str], max_partitions: int
) -> tuple[list[tuple[str, str, str]], list[tuple[str, str]]]:
    """The wanted runs that keep a query's own partitions (queries with a `queries` partition, and new ones while the
    set holds fewer than `max_partitions`), and `(step, query)` of the others, to be run in batches."""
    room, own, batched = max(0, max_partitions - len(known)), [], []
    for step, qid, partition in wanted:
        if qid in known:
            own.append((step, qid, partition))
        elif room > 0:
            own.append((step, qid, partition))
            room -= 1
        else:
            batched.append((step, qid))
    return own, sorted(batched, key=lambda sq: sq[1])


def _batched_queries(
    context: SensorEvaluationContext, statuses: list[DagsterRunStatus], root_url: str, attempts_only: bool = False
) -> list[str]:
    """The queries of the root's batch runs in `statuses`, once per run (`attempts_only`: not of released runs)."""
    runs = [t for t in runs_of_root(context.instance, statuses, root_url) if not (attempts_only and RELEASED_TAG in t)]
    return [q for t in runs if t.get(STEP_TAG) == BATCH_STEP for q in queries_of_tag(t.get(QUERIES_TAG, ""))]


def batch_requests(
    context: SensorEvaluationContext,
    root: Storage,
    inbox: InboxResource,
    files: dict[str, str],
    roots: list[str],
    batched: list[tuple[str, str]],
    runs: int,
) -> list[RunRequest]:
    """At most `runs` batch runs of up to `queries_per_batch` of the `batched` queries (sorted): none of a batch in
    flight, none whose batch runs failed `MAX_ATTEMPTS` times, a query without its clip judged first. Each batch's ids
    are written to the root under their digest, its partition key."""
    in_flight = set(_batched_queries(context, IN_PROGRESS, root.url))
    attempts = Counter(_batched_queries(context, [DagsterRunStatus.FAILURE], root.url, attempts_only=True))
    requests, chosen, left = [], [], 0
    for step, qid in batched:
        if qid in in_flight:
            continue
        if attempts[qid] >= MAX_ATTEMPTS:
            context.log.warning(
                f"query {qid}: the batch runs holding it failed {MAX_ATTEMPTS} times in this storage root; not "
                "requested again (see those runs; fix the query, then re-add it with another id or `tda attribute`)"
            )
            continue
        if len(requests) >= runs:
            left += 1
            continue
        if step == "clip" and not _judged_valid(context, root, files[qid], roots):
            continue
        chosen.append(qid)
        if len(chosen) == inbox.queries_per_batch:
            requests.append(_batch_request(root, chosen))
            chosen = []
    if chosen and len(requests) < runs:
        requests.append(_batch_request(root, chosen))
    if left:
        context.log.info(f"{left} more batched queries wait for the next tick")
    return requests


def _batch_request(root: Storage, query_ids: list[str]) -> RunRequest:
    """The run of one batch, its ids recorded in the root first."""
    partition = write_batch(root, query_ids)
    tags = {**run_tags(BATCH_STEP, root.url), QUERIES_TAG: batch_tag(query_ids)}
    return RunRequest(job_name=query_batch_job.name, partition_key=partition, tags=tags)


def partition_requests(
    context: SensorEvaluationContext, batch: list[RunRequest], known: set[str] | None = None
) -> list[AddDynamicPartitionsRequest]:
    """Adds the partitions the instance lacks: the requested queries' (`known`: the `queries` partitions already read
    this tick) and batches', and the default configuration's."""
    known = set(context.instance.get_dynamic_partitions(queries.name)) if known is None else known
    own = [r for r in batch if r.job_name != query_batch_job.name]
    new_queries = sorted({query_of(r) for r in own} - known)
    requests = [queries.build_add_request(new_queries)] if new_queries else []
    new_batches = sorted(
        {str(r.partition_key) for r in batch if r.job_name == query_batch_job.name}
        - set(context.instance.get_dynamic_partitions(query_batches.name))
    )
    if new_batches:
        requests.append(query_batches.build_add_request(new_batches))
    if DEFAULT_CONFIG not in context.instance.get_dynamic_partitions(configs.name):
        requests.append(configs.build_add_request([DEFAULT_CONFIG]))
    return requests


@sensor(
    jobs=[query_clip_job, attribute_config_job, query_batch_job],
    minimum_interval_seconds=30,
    default_status=DefaultSensorStatus.RUNNING,
)
def query_inbox_sensor(
    context: SensorEvaluationContext, storage: StorageResource, inbox: InboxResource, protocol: LossProtocolResource
) -> SensorResult | SkipReason:
    """Requests the runs of every pending inbox query (at most `max_queries_per_tick` runs per tick; past
    `max_query_partitions`, runs of batches of queries)."""
    root = storage.root()
    release_dead_runs(context.instance, Env.read().run_stale_s, context.log.warning)  # a killed command's runs
    roots = inbox.allowed_roots(root)  # a bad TDA_ALLOWED_AUDIO_ROOTS fails the tick, naming it
    files = inbox_files(root)
    valid = valid_query_ids(context, root, files)
    if not valid:
        return SkipReason(f"the inbox {root.uri(entry('inbox').glob())} has no query files")
    if not root.exists(key("checkpoint_record")):
        return SkipReason("no checkpoint in the storage root yet: run `tda prepare` (or materialize the training side)")
    wanted = wanted_runs(root, valid, protocol.protocol().protocol_id)
    known = set(context.instance.get_dynamic_partitions(queries.name))
    own, batched = split_by_budget(wanted, known, inbox.max_query_partitions)
    batch = run_requests(context, root, inbox, files, roots, own)
    if batched:
        batch += batch_requests(
            context, root, inbox, files, roots, batched, max(0, inbox.max_queries_per_tick - len(batch))
        )
    return SensorResult(run_requests=batch, dynamic_partitions_requests=partition_requests(context, batch, known))
