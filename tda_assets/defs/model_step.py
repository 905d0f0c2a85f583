"""What every step that runs the current checkpoint starts from: the storage root, compute, loss protocol, the
model, its record, and the identity its outputs carry."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import polars as pl
import torch
from dagster import AllPartitionMapping, AssetDep, AssetKey

from resources import ComputeResource, LossProtocolResource, ModelSourceResource, StorageResource
from tda_assets.attribution.adapter import DiTAdapter, ItemBatch
from tda_assets.attribution.devices import Compute
from tda_assets.attribution.protocol import LossProtocol
from tda_assets.attribution.settings import UnlearningSettings
from tda_assets.defs.fast_paths import item_norms
from tda_assets.io.artifacts import Identity, all_features, baseline_item_ids, read_baseline, read_fisher
from tda_assets.io.checkpoints import CheckpointRecord, load_checkpoint
from tda_assets.io.storage import Storage

# What a step that unlearns training items as queries reads: the Fisher, every shard's baseline losses and gradients.
TRAINING_SIDE_DEPS = [
    AssetKey("fisher_diagonal"),
    AssetDep(AssetKey("baseline_losses"), partition_mapping=AllPartitionMapping()),
    AssetDep(AssetKey("training_gradients"), partition_mapping=AllPartitionMapping()),
]


@dataclass(frozen=True)
class ModelStep:
    """The resources of one step, made concrete, with the current checkpoint loaded on the compute device."""

    store: Storage
    compute: Compute
    protocol: LossProtocol
    adapter: DiTAdapter
    record: CheckpointRecord

    @property
    def identity(self) -> Identity:
        return Identity(self.record.checkpoint_id, self.protocol.protocol_id)

    def fisher(self, lazy: bool = False) -> Mapping[str, torch.Tensor]:
        """The Fisher diagonal of this identity (IdentityError with the fix when missing); `lazy`: each tensor read from
        storage when asked for (for a step that uses one at a time, as unlearning does)."""
        return read_fisher(self.store, self.identity, self.compute.precision, lazy)

    def item_norms(self, settings: UnlearningSettings, item_ids: list[str]) -> np.ndarray | None:
        """The items' gradient norms for score_type `normalized` (None for other score types; IdentityError with the fix
        when the configuration's training_gradients store is missing)."""
        return item_norms(self.store, self.identity, settings, self.record.encoder_id, item_ids)

    def training_set(self) -> tuple[list[str], ItemBatch, pl.DataFrame]:
        """The items that have baseline losses of this identity, their features in that order, and those losses."""
        baseline = read_baseline(self.store, self.identity, self.record.encoder_id)
        item_ids = baseline_item_ids(baseline)
        data = all_features(self.store, self.record.encoder_id)
        return item_ids, data.select([data.item_ids.index(i) for i in item_ids]), baseline


def model_step(
    storage: StorageResource,
    model_source: ModelSourceResource,
    compute: ComputeResource,
    protocol: LossProtocolResource,
) -> ModelStep:
    """Resolve the resources and load the checkpoint the storage root records (cached per process)."""
    store, cmp = storage.storage(), compute.compute()
    adapter, record = load_checkpoint(store, model_source.model_source(), cmp.device)
    return ModelStep(store, cmp, protocol.protocol(), adapter, record)
