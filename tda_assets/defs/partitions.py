"""Partitions of DESIGN §2: static training shards and dynamic queries (keys are safe slugs)."""

from __future__ import annotations

from dagster import DynamicPartitionsDefinition, StaticPartitionsDefinition

from resources.env import shard_count
from tda_assets.data.manifests import shard_keys

SHARD_KEYS = shard_keys(shard_count())  # the code location's shards, fixed when it loads (TDA_SHARDS)
training_shards = StaticPartitionsDefinition(SHARD_KEYS)
queries = DynamicPartitionsDefinition(name="queries")
