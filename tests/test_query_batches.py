"""Queries past the partition budget (TDA_MAX_QUERY_PARTITIONS): the inbox sensor keeps a query's own partitions and
runs up to the bound and groups the rest into `query_batches` runs; a batch run writes each query's results to the same
files as its own runs, a failing query in it leaves the others attributed and is retried at most MAX_ATTEMPTS times;
`tda queries` shows a running batch's queries as running."""

from __future__ import annotations

import contextlib
import io
import json
import uuid

import pytest
from dagster import DagsterInstance, DagsterRun, DagsterRunStatus, RunsFilter, build_sensor_context

from resources import InboxResource, LossProtocolResource, StorageResource
from tda_assets.data.inbox import add_query
from tda_assets.data.query_batches import QUERIES_TAG, batch_key, queries_of_tag, read_batch
from tda_assets.io.checkpoints import CheckpointRecord, write_checkpoint_record
from tda_assets.io.registry import key
from tda_assets.io.storage import Storage

BOUND = 2
VALID = ("a-0", "a-1", "b-0", "b-1", "b-2")  # sorted: the first BOUND keep their own partitions


def batch_run(instance: DagsterInstance, request, status: DagsterRunStatus = DagsterRunStatus.STARTED) -> str:
    """The run of a sensor's request, as the daemon would have created and started it (not executed)."""
    run_id = str(uuid.uuid4())
    instance.add_run(DagsterRun(job_name=request.job_name, run_id=run_id, status=status, tags=request.tags))
    return run_id


def tick(instance: DagsterInstance, root: Storage, **inbox: int):
    """One evaluation of the inbox sensor on `instance`, with the inbox settings `inbox`."""
    from tda_assets.defs.sensors import query_inbox_sensor

    context = build_sensor_context(
        instance=instance,
        resources={
            "storage": StorageResource(url=root.url),
            "inbox": InboxResource(**inbox),
            "protocol": LossProtocolResource(),
        },
    )
    return query_inbox_sensor(context)


@pytest.fixture
def inbox_root(tmp_path) -> Storage:
    """A root with a checkpoint record (no model) and 250 prompt queries in its inbox."""
    root = Storage(str(tmp_path / "storage"))
    write_checkpoint_record(root, CheckpointRecord("ckpt", "external", "a folder", "enc"))
    for i in range(250):
        add_query(root, f"tune {i}", f"q-{i:03d}", seed=i)
    return root


def test_the_batch_of_the_same_ids_is_the_same_partition_whatever_their_order():
    assert batch_key(["b", "a", "c"]) == batch_key(["c", "b", "a", "a"]) != batch_key(["a", "b"])
    assert batch_key(["a"]).startswith("batch-") and len(batch_key(["a"])) == len("batch-") + 16


def test_past_the_bound_a_tick_requests_batches_of_sorted_pending_queries(inbox_root):
    with DagsterInstance.ephemeral() as instance:
        result = tick(instance, inbox_root, max_query_partitions=0, queries_per_batch=100)
        sizes = [len(queries_of_tag(r.tags[QUERIES_TAG])) for r in result.run_requests]
        first = result.run_requests[0]
        added = {r.partitions_def_name: list(r.partition_keys) for r in result.dynamic_partitions_requests}
    assert sizes == [100, 100, 50] and {r.job_name for r in result.run_requests} == {"attribute_batch"}
    assert read_batch(inbox_root, first.partition_key) == [f"q-{i:03d}" for i in range(100)]
    assert added["query_batches"] == sorted(str(r.partition_key) for r in result.run_requests)
    assert "queries" not in added  # no query partition past the bound


def test_a_tick_requests_at_most_max_queries_per_tick_runs_of_batches(inbox_root):
    with DagsterInstance.ephemeral() as instance:
        result = tick(instance, inbox_root, max_query_partitions=0, queries_per_batch=10, max_queries_per_tick=4)
    covered = [q for r in result.run_requests for q in queries_of_tag(r.tags[QUERIES_TAG])]
    assert len(result.run_requests) == 4 and covered == [f"q-{i:03d}" for i in range(40)]


def test_under_the_bound_queries_keep_their_own_runs_and_the_rest_are_batched(inbox_root):
    with DagsterInstance.ephemeral() as instance:
        result = tick(instance, inbox_root, max_query_partitions=3, queries_per_batch=100)
    own = [r for r in result.run_requests if r.job_name == "query_clip"]
    batches = [r for r in result.run_requests if r.job_name == "attribute_batch"]
    assert [r.partition_key for r in own] == ["q-000", "q-001", "q-002"]
    assert [queries_of_tag(r.tags[QUERIES_TAG])[0] for r in batches] == ["q-003", "q-103", "q-203"]


def test_the_same_pending_set_does_not_request_a_second_batch_run_while_the_first_is_in_flight(inbox_root):
    with DagsterInstance.ephemeral() as instance:
        first = tick(instance, inbox_root, max_query_partitions=0).run_requests
        for request in first:
            batch_run(instance, request)
        again = tick(instance, inbox_root, max_query_partitions=0)
    assert len(first) == 3 and not getattr(again, "run_requests", None)


def test_a_query_whose_batch_runs_failed_max_attempts_times_is_not_batched_again(inbox_root):
    from tda_assets.defs.sensors import MAX_ATTEMPTS

    with DagsterInstance.ephemeral() as instance:
        request = tick(instance, inbox_root, max_query_partitions=0).run_requests[0]  # q-000 … q-099
        for _ in range(MAX_ATTEMPTS):
            batch_run(instance, request, DagsterRunStatus.FAILURE)
        after = tick(instance, inbox_root, max_query_partitions=0).run_requests
    covered = [q for r in after for q in queries_of_tag(r.tags[QUERIES_TAG])]
    assert covered == [f"q-{i:03d}" for i in range(100, 250)]


def test_queries_shows_the_queries_of_a_running_batch_as_running(inbox_root, tmp_path, monkeypatch):
    from tda_assets.cli import main

    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    monkeypatch.setenv("TDA_STORAGE_URL", inbox_root.url)
    monkeypatch.delenv("TDA_INSTANCE", raising=False)
    with DagsterInstance.get() as instance:
        request = tick(instance, inbox_root, max_query_partitions=0, queries_per_batch=100).run_requests[0]
        batch_run(instance, request, DagsterRunStatus.STARTED)
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        assert main(["queries"]) == 0
    assert printed.getvalue().splitlines()[-1] == "100 running, 150 waiting"


# --- end to end on the SMALL trained root: the bound set to 2 through its environment variable ------------------------


@pytest.fixture(scope="module")
def drained(trained_roots, tmp_path_factory):
    """A copy of the SMALL root with 5 prompt queries and one whose clip cannot be decoded, the bound at 2; the first
    tick's requests, then the inbox drained by the Runner (the sensor's runs, executed in process)."""
    from tests.trained_roots import SMALL

    mp = pytest.MonkeyPatch()
    mp.setenv("TDA_MAX_QUERY_PARTITIONS", str(BOUND))
    runner = trained_roots.runner(SMALL, tmp_path_factory.mktemp("storage"), mp)
    runner.log_level = "ERROR"
    root = runner.root
    for i, qid in enumerate(VALID):
        add_query(root, f"a tune for {qid}", qid, seed=i)
    bad = root.write_bytes(key("upload", name="b-broken.wav"), b"RIFF\x00\x00\x00\x00WAVEnot audio at all")
    root.write_bytes(
        key("inbox", name="b-broken.json"), json.dumps({"prompt": "a broken clip", "audio_uri": bad}).encode()
    )
    first = runner.sensor_tick()
    drain = runner.drain_inbox()
    yield runner, root, first, drain
    mp.undo()


def state_of(runner, root) -> dict[str, str]:
    from tda_assets.experiments.query_listing import query_table

    protocol_id = runner.resources["protocol"].protocol().protocol_id
    return dict(query_table(root, protocol_id).select("query_id", "state").iter_rows())


def test_the_first_tick_runs_queries_within_the_bound_alone_and_batches_the_rest(drained):
    runner, _, first, _ = drained
    own = sorted(str(r.partition_key) for r in first if r.job_name == "query_clip")
    batches = [queries_of_tag(r.tags[QUERIES_TAG]) for r in first if r.job_name == "attribute_batch"]
    assert own == ["a-0", "a-1"] and batches == [["b-0", "b-1", "b-2", "b-broken"]]
    assert sorted(runner.instance.get_dynamic_partitions("queries")) == ["a-0", "a-1"]


def test_every_valid_query_is_attributed_each_in_its_own_result_file(drained):
    from tda_assets.io.checkpoints import read_checkpoint_record
    from tda_assets.io.query_engine import QueryEngine
    from tda_assets.io.tables import table_exists

    runner, root, _, drain = drained
    states = state_of(runner, root)
    assert {q: states[q] for q in VALID} == dict.fromkeys(VALID, "attributed")
    protocol_id = runner.resources["protocol"].protocol().protocol_id
    ident = {"checkpoint_id": read_checkpoint_record(root).checkpoint_id, "protocol_id": protocol_id}
    for qid in VALID:
        assert table_exists(root, "attribution_scores", **ident, query_id=qid, config_id="default"), qid
    per_query = QueryEngine(root, protocol_id=protocol_id).sql(
        "SELECT query_id, count(*) AS n FROM attributions WHERE method = 'unlearning' "
        "GROUP BY query_id ORDER BY query_id"
    )
    assert per_query["query_id"].to_list() == list(VALID)
    assert per_query["n"].to_list() == [6] * 5  # one row per training item of the SMALL root (2 artists × 3 clips)
    assert sorted(drain.attributed) == list(VALID)


def test_a_failing_query_leaves_its_batch_attributed_and_is_retried_at_most_max_attempts_times(drained):
    from tda_assets.defs.sensors import MAX_ATTEMPTS

    runner, root, _, drain = drained
    assert state_of(runner, root)["b-broken"] == "waiting"
    failed = runner.instance.get_run_records(RunsFilter(statuses=[DagsterRunStatus.FAILURE]))
    holding = [r for r in failed if "b-broken" in queries_of_tag(r.dagster_run.tags.get(QUERIES_TAG, ""))]
    assert len(holding) == MAX_ATTEMPTS and len(failed) == MAX_ATTEMPTS
    assert [q for q, _ in drain.failed] == ["b-broken"] * MAX_ATTEMPTS
    assert "batch run batch-" in drain.failed[0][1]
    assert runner.sensor_tick() == []  # given up: nothing left to request
