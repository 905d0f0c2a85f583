"""A small storage root for identity tests: 6 embedded items (2 artists × 3) on 20 training steps, protocol seed 0,
the training side materialized and one inbox query `q0`."""

from __future__ import annotations

import pytest
from dagster import DagsterInstance

from tda_assets.data.inbox import add_query
from tda_assets.experiments.runner import Runner

MANIFEST = {"clips_per_artist": 3, "artists": 2}  # 6 items over 4 shards: shard-01 is empty


def small_root(tmp_path_factory: pytest.TempPathFactory, mp: pytest.MonkeyPatch) -> tuple[str, Runner]:
    """The root's URL and a Runner on an ephemeral instance; `mp` holds the environment until the caller undoes it."""
    mp.setenv("TDA_TRAIN_STEPS", "20")
    mp.setenv("TDA_PROTOCOL_SEED", "0")
    root = str(tmp_path_factory.mktemp("storage"))
    runner = Runner.create(DagsterInstance.ephemeral(), root, log=lambda _m: None)
    runner.log_level = "WARNING"
    runner.training_side(MANIFEST)
    add_query(runner.storage, "a plucked guitar tune", query_id="q0")
    return root, runner
