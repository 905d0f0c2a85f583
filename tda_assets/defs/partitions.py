"""Partitions of DESIGN §2: static training shards, dynamic queries, and (query × config) for the per-configuration
assets, so the UI shows each configuration's status for each query (keys are safe slugs); past the partition budget,
dynamic batches of queries (`query_batches`)."""

from __future__ import annotations

from dagster import (
    AssetExecutionContext,
    DynamicPartitionsDefinition,
    MultiPartitionKey,
    MultiPartitionsDefinition,
    StaticPartitionsDefinition,
)

from resources.env import shard_count
from tda_assets.data.manifests import shard_keys

SHARD_KEYS = shard_keys(shard_count())  # the code location's shards, fixed when it loads (TDA_SHARDS)
training_shards = StaticPartitionsDefinition(SHARD_KEYS)
queries = DynamicPartitionsDefinition(name="queries")
configs = DynamicPartitionsDefinition(name="configs")
query_configs = MultiPartitionsDefinition({"query": queries, "config": configs})
query_batches = DynamicPartitionsDefinition(name="query_batches")  # past TDA_MAX_QUERY_PARTITIONS: `batch-<digest>`


def query_config_key(query_id: str, config_id: str) -> MultiPartitionKey:
    """The (query × config) partition key of one query under one configuration."""
    return MultiPartitionKey({"query": query_id, "config": config_id})


def query_and_config(context: AssetExecutionContext) -> tuple[str, str]:
    """`(query_id, config_id)` of a per-configuration asset's partition."""
    keys = context.partition_key.keys_by_dimension
    return keys["query"], keys["config"]
