"""Dagster resources: the storage root, the model source, the compute device, the loss protocol, the DuckDB engine."""

from .compute import ComputeResource, LossProtocolResource
from .model_source import ModelSourceResource
from .storage_resource import QueryEngineResource, StorageResource, default_storage_url

__all__ = [
    "ComputeResource",
    "LossProtocolResource",
    "ModelSourceResource",
    "QueryEngineResource",
    "StorageResource",
    "default_storage_url",
]
