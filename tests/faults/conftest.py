"""One uninterrupted run on a tiny embedded corpus (training side and one query) that every fault is compared with."""

from __future__ import annotations

import hashlib
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest
import torch
from dagster import DagsterInstance

from tda_assets.data.demo import builtin_queries
from tda_assets.defs.configs import UnlearningConfig
from tda_assets.experiments.runner import Runner

MANIFEST = {"clips_per_artist": 3, "artists": 2}
TRAIN_STEPS = "40"  # part of the embedded checkpoint's identity: every runner of these tests uses it
CONFIG = UnlearningConfig(lr=100.0)


@dataclass(frozen=True)
class Reference:
    """The storage root of the uninterrupted run and its query."""

    root: Path
    query_id: str

    def copy(self, dest: Path) -> Path:
        """A copy of the whole root to damage."""
        shutil.copytree(self.root, dest)
        return dest


def runner_on(url: str, monkeypatch: pytest.MonkeyPatch) -> Runner:
    """A Runner on a fresh ephemeral instance over the storage root `url`, with the reference's settings."""
    monkeypatch.setenv("TDA_TRAIN_STEPS", TRAIN_STEPS)
    return Runner.create(DagsterInstance.ephemeral(), url, log=lambda _m: None)


def snapshot(root: Path) -> dict[str, str]:
    """`relative path → sha256` of every file under a local root, hidden ones included."""
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@contextmanager
def one_torch_thread() -> Iterator[None]:
    """torch on one thread (as the killed child runs): on a shared 2-core machine two threads spin-wait, 10-50x
    slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _one_torch_thread() -> Iterator[None]:
    with one_torch_thread():
        yield


@pytest.fixture(scope="session")
def reference(tmp_path_factory) -> Reference:
    """Training side (2 artists × 3 clips, 4 shards) and one built-in query attributed, uninterrupted."""
    mp = pytest.MonkeyPatch()
    root = tmp_path_factory.mktemp("reference")
    with one_torch_thread():
        runner = runner_on(str(root), mp)
        runner.training_side(MANIFEST)
        builtin_queries(runner.storage, artists=1)
        (query_id,) = runner.requested_queries()
        runner.attribute(query_id, CONFIG)
    mp.undo()
    return Reference(root, query_id)
