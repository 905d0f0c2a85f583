"""S3 outage: the loopback S3 server stopped in the middle of a query's run gives one clear error naming the endpoint;
once it is back (same port), the rerun completes, equals an uninterrupted run, and nothing written before is lost."""

from __future__ import annotations

import hashlib
import logging

import pytest
from moto.server import ThreadedMotoServer

import tda_assets.defs.assets.queries as query_assets
from tda_assets.io.storage import Storage, StorageError
from tda_assets.io.tables import read_table, read_tables
from tests.faults.conftest import CONFIG, runner_on
from tests.s3_server import use_moto

QUERY_OUTPUTS = (
    "query_clips",
    "queries",
    "unlearned_model",
    "unlearning_runs",
    "unlearned_losses",
    "attribution_scores",
    "similarity_scores",
    "unlearning_configs",
    "plots",
)


def objects(root: Storage) -> dict[str, str]:
    """`key → sha256` of every object under the root."""
    root.fs.invalidate_cache()
    return {
        path[len(root.fs_path) + 1 :]: hashlib.sha256(root.fs.cat_file(path)).hexdigest()
        for path in root.fs.find(root.fs_path)
    }


@pytest.fixture
def server():
    """A loopback S3 server of this test's own (the shared one must not stop), and a way to stop and restart it."""
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    box = {"server": ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)}
    box["server"].start()
    host, port = box["server"].get_host_and_port()
    box["endpoint"], box["port"] = f"http://{host}:{port}", port
    yield box
    box["server"].stop()  # moto keeps its buckets process-wide, so a restart on the same port finds them


def test_s3_stopped_mid_run_names_the_endpoint_and_the_rerun_loses_nothing(reference, server, monkeypatch):
    root_url = use_moto(monkeypatch, server["endpoint"], prefix="tda")
    root = Storage(root_url)
    for path in sorted(reference.root.rglob("*")):  # the training side and the inbox, as an earlier run left them
        rel = path.relative_to(reference.root).as_posix()
        if path.is_file() and rel.split("/")[0] not in QUERY_OUTPUTS:
            root.write_bytes(rel, path.read_bytes())
    before = objects(root)
    runner = runner_on(root_url, monkeypatch)
    assert runner.requested_queries() == [reference.query_id]

    real_stream = query_assets.stream_losses

    def outage_after_the_first_batch(*args, **kwargs):
        for n, batch in enumerate(real_stream(*args, **kwargs)):
            if n == 1:
                server["server"].stop()  # mid unlearned_losses: the delta and run row are written, the losses not yet
            yield batch

    monkeypatch.setattr(query_assets, "stream_losses", outage_after_the_first_batch)
    with pytest.raises(StorageError) as err:  # one error, the storage layer's: not a botocore or aiohttp trace
        runner.attribute(reference.query_id, CONFIG)
    message = str(err.value)
    assert f"cannot reach the S3 endpoint {server['endpoint']} for {root_url}/" in message
    assert "is the server running? Set AWS_ENDPOINT_URL" in message and "Once it is up, rerun" in message
    monkeypatch.setattr(query_assets, "stream_losses", real_stream)

    server["server"] = ThreadedMotoServer(ip_address="127.0.0.1", port=server["port"], verbose=False)
    server["server"].start()
    during = objects(root)
    assert {k: during.get(k) for k in before} == before  # nothing written before the outage is lost
    assert not any(
        k.startswith(("unlearned_losses/", "attribution_scores/")) for k in during
    )  # and nothing half-written

    runner.attribute(reference.query_id, CONFIG)  # the rerun, once the server is back

    after = objects(root)
    assert {k: after.get(k) for k in before} == before
    local = Storage(str(reference.root))
    keys = {"query_id": reference.query_id, "config_id": CONFIG.config_id}
    identity = (
        read_tables(local, "attribution_scores", **keys).select("checkpoint_id", "protocol_id").row(0, named=True)
    )
    for table, table_keys in [
        ("unlearned_losses", {**keys, **identity}),
        ("attribution_scores", {**keys, **identity}),
        ("unlearning_runs", {**keys, **identity}),
        ("similarity_scores", {"query_id": reference.query_id, "method": "similarity:internal"}),
    ]:
        got, want = read_table(root, table, **table_keys), read_table(local, table, **table_keys)
        if table == "unlearning_runs":  # where the delta lives and how long it took differ by nature
            got, want = got.drop("delta_uri", "seconds"), want.drop("delta_uri", "seconds")
        assert got.equals(want), table
