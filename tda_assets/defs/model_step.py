"""What every step that runs the current checkpoint starts from: the storage root, compute, loss protocol, the
model, its record, and the identity its outputs carry."""

from __future__ import annotations

from dataclasses import dataclass

from resources import ComputeResource, LossProtocolResource, ModelSourceResource, StorageResource
from tda_assets.attribution.adapter import DiTAdapter
from tda_assets.attribution.devices import Compute
from tda_assets.attribution.protocol import LossProtocol
from tda_assets.io.artifacts import Identity
from tda_assets.io.checkpoints import CheckpointRecord, load_checkpoint
from tda_assets.io.storage import Storage


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


def model_step(storage: StorageResource, model_source: ModelSourceResource, compute: ComputeResource,
               protocol: LossProtocolResource) -> ModelStep:
    """Resolve the resources and load the checkpoint the storage root records (cached per process)."""
    store, cmp = storage.storage(), compute.compute()
    adapter, record = load_checkpoint(store, model_source.model_source(), cmp.device)
    return ModelStep(store, cmp, protocol.protocol(), adapter, record)
