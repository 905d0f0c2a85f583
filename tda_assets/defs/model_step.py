"""What every step that runs the current checkpoint starts from: the storage root, compute, loss protocol, the
model, its record, and the identity its outputs carry."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np
import polars as pl
import torch
from dagster import AllPartitionMapping, AssetDep, AssetKey

from resources import ComputeResource, LossProtocolResource, ModelSourceResource, StorageResource
from tda_assets.attribution.adapter import DiTAdapter, ItemBatch
from tda_assets.attribution.devices import Compute
from tda_assets.attribution.protocol import LossProtocol
from tda_assets.attribution.settings import UnlearningSettings
from tda_assets.attribution.gradients import GradientSpec, GradientStore
from tda_assets.defs.fast_paths import item_norms, scoring_gradients
from tda_assets.io.artifacts import (
    Embeddings,
    Identity,
    all_features,
    baseline_item_ids,
    encoded_item_ids,
    read_baseline,
    read_fisher,
    read_training_embeddings,
)
from tda_assets.io.checkpoints import CheckpointRecord, load_checkpoint
from tda_assets.io.storage import Storage
from tda_assets.io.tables import read_table

# What a step that unlearns training items as queries reads: the Fisher, every shard's baseline losses and gradients.
TRAINING_SIDE_DEPS = [
    AssetKey("fisher_diagonal"),
    AssetDep(AssetKey("baseline_losses"), partition_mapping=AllPartitionMapping()),
    AssetDep(AssetKey("training_gradients"), partition_mapping=AllPartitionMapping()),
]


class TrainingReads:
    """The stored training side of one identity, each artifact read at most once through this object: a per-query
    step makes its own; a `query_batch` run shares one across its queries, so it reads them once per run."""

    def __init__(self, root: Storage, identity: Identity, encoder_id: str, precision: str | None = None) -> None:
        self.root, self.identity, self.encoder_id, self.precision = root, identity, encoder_id, precision
        self._memo: dict[tuple, Any] = {}

    def once(self, name: tuple, read: Callable[[], Any]) -> Any:
        """What `read` returns, read on the first call for `name` only."""
        if name not in self._memo:
            self._memo[name] = read()
        return self._memo[name]

    def baseline(self) -> pl.DataFrame:
        """Every shard's baseline losses (IdentityError with the fix when one is missing)."""
        return self.once(("baseline",), lambda: read_baseline(self.root, self.identity, self.encoder_id))

    def item_ids(self) -> list[str]:
        """The items with baseline losses, in their order."""
        return self.once(("item_ids",), lambda: baseline_item_ids(self.baseline()))

    def encoded_ids(self) -> list[str]:
        """The items the training side encoded (from the feature files' headers)."""
        return self.once(("encoded",), lambda: encoded_item_ids(self.root, self.encoder_id))

    def fisher(self, lazy: bool = False) -> Mapping[str, torch.Tensor]:
        """The Fisher diagonal; `lazy`: each tensor read from storage when asked for, never whole in memory (that
        reader is kept; a whole Fisher is not, so a step that passes it inline lets the search free it)."""
        if not lazy:
            return read_fisher(self.root, self.identity, self.precision)
        return self.once(("fisher",), lambda: read_fisher(self.root, self.identity, self.precision, lazy=True))

    def embeddings(self) -> Embeddings:
        """Every shard's training embeddings (IdentityError with the fix when missing)."""
        return self.once(("embeddings",), lambda: read_training_embeddings(self.root, self.identity, self.encoder_id))

    def manifest(self) -> pl.DataFrame:
        """`item_id, artist, caption` of the training manifest (the top-k tables' columns)."""
        return self.once(
            ("manifest",), lambda: read_table(self.root, "training_manifest").select("item_id", "artist", "caption")
        )

    def gradients(self, settings: UnlearningSettings, item_ids: list[str]) -> GradientStore | None:
        """`fast_paths.scoring_gradients` of the configuration, in `item_ids` order."""
        name = ("gradients", GradientSpec.for_settings(settings), settings.method, settings.stage, tuple(item_ids))
        return self.once(name, lambda: scoring_gradients(self.root, self.identity, settings, self.encoder_id, item_ids))

    def norms(
        self, settings: UnlearningSettings, item_ids: list[str], gradients: GradientStore | None = None
    ) -> np.ndarray | None:
        """`fast_paths.item_norms` of the configuration, in `item_ids` order."""
        name = ("norms", settings.score_type, GradientSpec.for_settings(settings), tuple(item_ids))
        return self.once(
            name, lambda: item_norms(self.root, self.identity, settings, self.encoder_id, item_ids, gradients)
        )


@dataclass(frozen=True)
class ModelStep:
    """The resources of one step, made concrete, with the current checkpoint loaded on the compute device."""

    root: Storage
    compute: Compute
    protocol: LossProtocol
    adapter: DiTAdapter
    record: CheckpointRecord

    @property
    def identity(self) -> Identity:
        return Identity(self.record.checkpoint_id, self.protocol.protocol_id)

    @cached_property
    def side(self) -> TrainingReads:
        """This step's reads of the training side (each once)."""
        return TrainingReads(self.root, self.identity, self.record.encoder_id, self.compute.precision)

    def fisher(self, lazy: bool = False) -> Mapping[str, torch.Tensor]:
        """The Fisher diagonal of this identity (IdentityError with the fix when missing); `lazy`: each tensor read from
        storage when asked for (for a step that uses one at a time, as unlearning does)."""
        return self.side.fisher(lazy)

    def item_norms(self, settings: UnlearningSettings, item_ids: list[str]) -> np.ndarray | None:
        """The items' gradient norms for score_type `normalized` (None for other score types; IdentityError with the fix
        when the configuration's training_gradients store is missing)."""
        return self.side.norms(settings, item_ids)

    def training_set(self) -> tuple[list[str], ItemBatch, pl.DataFrame]:
        """The items that have baseline losses of this identity, their features in that order, and those losses."""

        def read() -> tuple[list[str], ItemBatch, pl.DataFrame]:
            item_ids = self.side.item_ids()
            data = all_features(self.root, self.record.encoder_id)
            return item_ids, data.select([data.item_ids.index(i) for i in item_ids]), self.side.baseline()

        return self.side.once(("training_set",), read)


def model_step(
    storage: StorageResource,
    model_source: ModelSourceResource,
    compute: ComputeResource,
    protocol: LossProtocolResource,
) -> ModelStep:
    """Resolve the resources and load the checkpoint the storage root records (cached per process)."""
    root, cmp = storage.root(), compute.compute()
    adapter, record = load_checkpoint(root, model_source.model_source(), cmp.device)
    return ModelStep(root, cmp, protocol.protocol(), adapter, record)
