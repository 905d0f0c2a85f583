"""Dagster resources (storage root, model source, compute, loss protocol, training data, inbox),
built from the environment in one place: `build_resources(Env.read())`.

Exports are lazy so that `resources.env` (plain Python) imports without Dagster.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "ComputeResource": ".compute",
    "LossProtocolResource": ".compute",
    "ModelSourceResource": ".model_source",
    "StorageResource": ".storage",
    "TrainingDataResource": ".data",
    "InboxResource": ".data",
    "build_resources": ".build",
    "Env": ".env",
}

if TYPE_CHECKING:
    from .build import build_resources
    from .compute import ComputeResource, LossProtocolResource
    from .data import InboxResource, TrainingDataResource
    from .env import Env
    from .model_source import ModelSourceResource
    from .storage import StorageResource


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'resources' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name], __name__), name)


__all__ = [
    "ComputeResource",
    "Env",
    "InboxResource",
    "LossProtocolResource",
    "ModelSourceResource",
    "StorageResource",
    "TrainingDataResource",
    "build_resources",
]
