"""One uninterrupted run on a tiny embedded corpus (the shared SMALL root's training side and one query) that every
fault is compared with."""

from __future__ import annotations

import hashlib
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest
from dagster import DagsterInstance

from tda_assets.data.demo import builtin_queries
from tda_assets.data.inbox import inbox_files
from tda_assets.defs.configs import UnlearningConfig
from tda_assets.experiments.runner import Runner
from tda_assets.io.storage import Storage
from tests.trained_roots import SMALL, TrainedRoots, built_once, one_torch_thread, shared_folder

TRAIN_STEPS = str(SMALL.steps)  # part of the embedded checkpoint's identity: every runner of these tests uses it
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


def snapshot(root_dir: Path) -> dict[str, str]:
    """`relative path → sha256` of every file under a local root, hidden ones included."""
    return {
        p.relative_to(root_dir).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root_dir.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(autouse=True)
def _one_torch_thread() -> Iterator[None]:
    with one_torch_thread():
        yield


@pytest.fixture(scope="session")
def reference(trained_roots: TrainedRoots, tmp_path_factory) -> Reference:
    """A copy of the SMALL root (2 artists × 3 clips, 4 shards) and one built-in query attributed, uninterrupted (built
    once for all pytest-xdist workers); read only."""

    def build(root_dir: Path) -> None:
        mp = pytest.MonkeyPatch()
        trained_roots.copy(SMALL, root_dir)
        with one_torch_thread():
            runner = runner_on(str(root_dir), mp)
            builtin_queries(runner.root, artists=1)
            (query_id,) = runner.requested_queries()
            runner.attribute(query_id, CONFIG)
        mp.undo()

    root_dir = built_once(shared_folder(tmp_path_factory, "faults"), "reference", build)
    (query_id,) = inbox_files(Storage(str(root_dir)))  # the one query `build` added
    return Reference(root_dir, query_id)
