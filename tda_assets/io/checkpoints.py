"""The checkpoint record (what the `checkpoint` asset made current) and loading its model from any storage root."""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from tda_assets.attribution.adapter import DiTAdapter
from tda_assets.attribution.memory import return_freed_memory
from tda_assets.models.model_folder import load_model
from tda_assets.models.sources import ModelSource, model_copies_dir

from .artifacts import features_digest
from .registry import key
from .storage import SUCCESS_MARKER, Storage


@dataclass(frozen=True)
class CheckpointRecord:
    """The current checkpoint: its id, how it was made, the encoders of its features, and where its folder is."""

    checkpoint_id: str
    kind: str  # embedded (trained here, folder under the storage root) | external (a folder, s3:// or hf://)
    source: str
    encoder_id: str
    revision: str | None = None  # the resolved hub commit
    folder_key: str | None = None  # the model folder under the storage root (embedded)

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes) -> "CheckpointRecord":
        return cls(**json.loads(data))

    def pinned_source(self) -> str:
        """The source to resolve again: a hub reference pinned to the commit it resolved to."""
        if self.source.startswith("hf://") and self.revision:
            return f"{self.source.partition('@')[0]}@{self.revision}"
        return self.source


def embedded_checkpoint_id(root: Storage, encoder_id: str, training: dict) -> str:
    """The id of an embedded model trained with `training` settings on the current features of `encoder_id`.

    It pins what the model was trained on: the features' bytes, their encoders and the training settings.
    """
    fingerprint = json.dumps([features_digest(root, encoder_id), encoder_id, training], sort_keys=True)
    return "embedded-" + hashlib.blake2b(fingerprint.encode(), digest_size=5).hexdigest()


def write_checkpoint_record(root: Storage, record: CheckpointRecord) -> str:
    """Make `record` the current checkpoint (atomic)."""
    return root.write_bytes(key("checkpoint_record"), record.to_json())


def read_checkpoint_record(root: Storage) -> CheckpointRecord:
    """The current checkpoint (FileNotFoundError with the fix when none was materialized)."""
    data = root.read_if_exists(key("checkpoint_record"))
    if data is None:
        raise FileNotFoundError(
            f"no checkpoint under {root.url} yet: materialize the `checkpoint` asset first (`tda prepare`)"
        )
    return CheckpointRecord.from_json(data)


def local_model_folder(root: Storage, record: CheckpointRecord, source: ModelSource) -> Path:
    """A local diffusers folder of the recorded checkpoint (copied from the storage root when it is remote)."""
    if record.folder_key:
        local = root.local_path(record.folder_key)
        if local:
            return Path(local)
        # the upload's _SUCCESS token keys the local copy: a re-trained folder under the same id is fetched again
        token = root.read_bytes(f"{record.folder_key}/{SUCCESS_MARKER}")
        slug = hashlib.sha1(root.uri(record.folder_key).encode()).hexdigest()[:10]
        target = model_copies_dir(source.cache_dir) / f"{record.checkpoint_id}-{slug}"
        return root.cached_copy(record.folder_key, target, token)
    return source.resolve(record.pinned_source()).folder


@functools.lru_cache(maxsize=2)
def _load_adapter(checkpoint_id: str, folder: str) -> DiTAdapter:
    return load_model(folder)


def load_checkpoint(root: Storage, source: ModelSource, device: str = "cpu") -> tuple[DiTAdapter, CheckpointRecord]:
    """The adapter of the current checkpoint (cached per process, on `device`, gradients on) and its record."""
    return_freed_memory()  # before the weights: what the step frees leaves the process (issue 21)
    record = read_checkpoint_record(root)
    adapter = _load_adapter(record.checkpoint_id, str(local_model_folder(root, record, source)))
    if str(adapter.device) != device:
        adapter.to(device)
    for p in adapter.denoiser.parameters():
        p.requires_grad_(True)
    return adapter, record


def load_checkpoint_encoders(
    root: Storage, source: ModelSource, device: str = "cpu"
) -> tuple[DiTAdapter, CheckpointRecord]:
    """The current checkpoint's frozen encoders (an external folder without its DiT weights), on `device`, and its
    record: for a step that only encodes. Not cached: a step that runs the denoiser loads it with `load_checkpoint`."""
    return_freed_memory()
    record = read_checkpoint_record(root)
    if record.kind == "embedded":  # 1.25 M parameters: the cached whole model, loaded once per process
        return load_checkpoint(root, source, device)
    adapter = load_model(local_model_folder(root, record, source), denoiser=False)
    return adapter.to(device), record
