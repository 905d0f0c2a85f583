"""Shared fixtures: a small embedded corpus and a model trained on it once per test session; the trained storage roots
the slow tests share (`trained_roots`)."""

from __future__ import annotations

import os

import pytest
import torch

from tda_assets.attribution.adapter import ItemBatch
from tda_assets.attribution.devices import Compute
from tda_assets.data.corpus import generate_corpus
from tda_assets.models.embedded.model import EmbeddedAdapter
from tda_assets.attribution.fisher import fisher_diagonal
from tda_assets.attribution.protocol import LossProtocol
from tests.corpus_model import CLIPS_PER_ARTIST, STEPS, train_on_corpus
from tests.s3_server import s3_root  # noqa: F401  (fixture)
from tests.trained_roots import TrainedRoots, shared_folder

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# two threads on 2 idle cores, split among pytest-xdist workers (`make test` runs 2: one thread each, and the CLI
# processes the tests start inherit it); OMP_NUM_THREADS, when set, wins (on busy shared cores a second thread spins: 60
# training steps of the tiny model took 424 s with 2 threads against 8.6 s with 1 while other test runs used the cores)
WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT") or 1)
if WORKERS > 1:
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, min(2, (os.cpu_count() or 1) // WORKERS))))
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or min(2, os.cpu_count() or 1)))

TRAIN_STEPS = int(os.environ.get("TDA_TEST_TRAIN_STEPS", str(STEPS)))

# The test tiers (`make test-fast` = `pytest -m "not slow"`; `make test` runs all). A test is `slow` when it needs a
# trained model, a Runner root or a server: it uses one of SLOW_FIXTURES (directly or through another fixture) or its
# body calls one of SLOW_CALLS. A new fixture or helper that trains, builds a root or starts a server goes here.
SLOW_FIXTURES = frozenset(
    {
        "trained",
        "model",  # a trained model: conftest's embedded model, tiny_model.tiny_trained
        "prepared",
        "materialized",
        "pipeline",
        "evaluated",
        "product",
        "own_corpus",
        "first",
        "grid",  # Runner roots
        "trained_roots",
        "reference",
        "scenario",
        "jobs",
        "env",
        "s3_run",
        "external_run",
        "drained_inbox",
        "s3_root",
        "server",
        "webserver",
        "postgres",  # servers: moto S3, dagster-webserver, PostgreSQL
    }
)
SLOW_CALLS = frozenset({"tiny_trained", "Runner", "bench"})  # bench: tests/test_benchmarks_run.py


def is_slow(item: pytest.Item) -> bool:
    """Whether the test needs a trained model, a Runner root or a server (the one rule of the `slow` marker)."""
    function = getattr(item, "function", None)
    calls = set(function.__code__.co_names) if function is not None else set()
    return bool(SLOW_FIXTURES.intersection(getattr(item, "fixturenames", ())) or SLOW_CALLS & calls)


# Under pytest-xdist (`make test`: `-n 2 --dist loadgroup`) a worker runs whole modules (an `xdist_group` each, so a
# module fixture is built once), and every module with a test on the session model `trained` runs on one worker (it is
# trained once); modules that train come first, then the other slow ones, the fast ones fill the end.
MODEL_GROUP = "trained-model"


def xdist_groups(items: list[pytest.Item]) -> dict[pytest.Item, str]:
    """The worker group of each test: its module, or MODEL_GROUP for every test of a module where one uses `trained`."""
    module = {item: item.nodeid.split("::")[0] for item in items}
    on_model = {module[item] for item in items if "trained" in getattr(item, "fixturenames", ())}
    return {item: MODEL_GROUP if module[item] in on_model else module[item] for item in items}


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects and before xdist reads the groups
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark `slow` every test `is_slow` names, so `-m "not slow"` is the fast tier; no test is marked by hand. In an
    xdist worker, also group the tests and order the groups (`xdist_groups`)."""
    for item in items:
        if is_slow(item):
            item.add_marker(pytest.mark.slow)
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return
    groups = xdist_groups(items)
    slow_groups = {groups[item] for item in items if item.get_closest_marker("slow")}
    for item in items:
        item.add_marker(pytest.mark.xdist_group(groups[item]))
    items.sort(key=lambda item: (groups[item] != MODEL_GROUP, groups[item] not in slow_groups))  # stable


@pytest.fixture(scope="session")
def corpus_rows(tmp_path_factory) -> list[dict]:
    return generate_corpus(tmp_path_factory.mktemp("corpus"), clips_per_artist=CLIPS_PER_ARTIST, seed=0)


@pytest.fixture(scope="session")
def trained(corpus_rows) -> tuple[EmbeddedAdapter, ItemBatch]:
    """The embedded model trained on the small corpus, and the corpus as one encoded batch."""
    return train_on_corpus(corpus_rows, TRAIN_STEPS)


@pytest.fixture(scope="session")
def protocol() -> LossProtocol:
    return LossProtocol(seed=0, draws=16)


@pytest.fixture(scope="session")
def fisher(trained, protocol) -> dict[str, torch.Tensor]:
    adapter, batch = trained
    return fisher_diagonal(adapter, [batch], protocol, "all", Compute(), max_items=64)


@pytest.fixture(scope="session")
def trained_roots(tmp_path_factory) -> TrainedRoots:
    """The one builder of the trained storage roots the slow tests share, parametrised by a RootSpec
    (tests/trained_roots.py): each spec's training side is built once per session (once for all xdist workers) and
    lent as a copy."""
    return TrainedRoots(shared_folder(tmp_path_factory, "trained-roots"))
