"""Storage roots holding a training side, built once per test session by one builder (the `trained_roots` fixture of
tests/conftest.py) and lent to the tests as copies: a test changes its copy, never the built root. Under pytest-xdist
the workers share one build (`built_once`: a file lock in the folder all workers share)."""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import pytest
import torch
from dagster import DagsterInstance
from filelock import FileLock

from tda_assets.experiments.runner import Runner


@contextmanager
def one_torch_thread() -> Iterator[None]:
    """torch on one thread (as a step's child process runs): on a shared 2-core machine two threads spin-wait, 10-50x
    slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@dataclass(frozen=True)
class RootSpec:
    """A root's training side: the embedded corpus (`artists` × `clips` per artist over 4 shards) and the training steps
    of its model (part of the checkpoint's identity: a Runner on the root needs them in its environment)."""

    artists: int
    clips: int
    steps: int

    @property
    def manifest(self) -> dict[str, int]:
        return {"clips_per_artist": self.clips, "artists": self.artists}

    @property
    def env(self) -> dict[str, str]:
        """The environment under which the root's training side is current."""
        return {"TDA_TRAIN_STEPS": str(self.steps), "TDA_PROTOCOL_SEED": "0"}

    def __str__(self) -> str:
        return f"{self.artists}x{self.clips}-{self.steps}steps"


SMALL = RootSpec(artists=2, clips=3, steps=40)  # 6 items, shard-01 empty: identity tests, the faults' reference
TINY = RootSpec(artists=3, clips=4, steps=60)  # 12 items: pipeline, fast paths, counterfactual, evaluate, scale
GRID = RootSpec(artists=8, clips=5, steps=60)  # 40 items: a top-10 is a quarter of the corpus (tests/test_grid.py)


def shared_folder(tmp_path_factory: pytest.TempPathFactory, name: str) -> Path:
    """`name` in the temporary folder all pytest-xdist workers of this session share (the session's own without
    xdist): where a build made once for every worker lives (`built_once`)."""
    base = tmp_path_factory.getbasetemp()
    folder = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / name
    folder.mkdir(exist_ok=True)
    return folder


def built_once(folder: Path, name: str, build: Callable[[Path], None]) -> Path:
    """`folder/name`, made by `build` by the first test process that asks (the others wait on its lock, then read it);
    a build that died half way is removed and redone. `folder` is shared by all pytest-xdist workers of a session."""
    target, done = folder / name, folder / f"{name}.done"
    with FileLock(str(folder / f"{name}.lock")):
        if not done.exists():
            shutil.rmtree(target, ignore_errors=True)
            build(target)
            done.touch()
    return target


class TrainedRoots:
    """Each RootSpec's root, its training side materialized in process on a throwaway instance on first use (by
    whichever pytest-xdist worker asks first; `folder` is the one all workers share)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.built: dict[RootSpec, Path] = {}

    def built_root(self, spec: RootSpec) -> Path:
        """The root of `spec`, built once (on one torch thread, as the fault tests' step processes run); read only."""
        if spec not in self.built:
            self.built[spec] = built_once(self.folder, str(spec), lambda root_dir: self.build(spec, root_dir))
        return self.built[spec]

    @staticmethod
    def build(spec: RootSpec, root_dir: Path) -> None:
        """Materialize the training side of `spec` at `root_dir` in process, on a throwaway instance."""
        with pytest.MonkeyPatch.context() as mp, one_torch_thread():
            for name, value in {**spec.env, "TDA_EXECUTOR": "in_process"}.items():  # an ephemeral instance
                mp.setenv(name, value)
            runner = Runner.create(DagsterInstance.ephemeral(), str(root_dir), log=lambda _m: None)
            runner.log_level = "WARNING"
            runner.training_side(spec.manifest)

    def copy(self, spec: RootSpec, dest: Path) -> Path:
        """A copy of the root of `spec` at `dest` (missing or empty) for a test to change: cheaper than a rebuild."""
        shutil.copytree(self.built_root(spec), dest, dirs_exist_ok=True)
        return dest

    def runner(self, spec: RootSpec, dest: Path, mp: pytest.MonkeyPatch) -> Runner:
        """A Runner on a fresh ephemeral instance over a copy of the root of `spec` at `dest`; `mp` holds the root's
        environment until the caller undoes it."""
        self.copy(spec, dest)
        for name, value in spec.env.items():
            mp.setenv(name, value)
        return Runner.create(DagsterInstance.ephemeral(), str(dest), log=lambda _m: None)

    def in_copy(self, spec: RootSpec, uri: str, dest: Path) -> str:
        """The file a URI of the built root names (the training manifest's audio_uri do), in the copy at `dest`."""
        return str(dest / Path(uri).relative_to(self.built_root(spec)))
