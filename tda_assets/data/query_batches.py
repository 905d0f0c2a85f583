"""Batches of inbox queries past Dagster's partition budget: one `query_batches` partition and one run for up to
`queries_per_batch` queries, its sorted ids kept in the storage root under a digest of them (the same pending set
names the same batch)."""

from __future__ import annotations

import hashlib
import json

from tda_assets.io.registry import key
from tda_assets.io.slugs import check_query_id
from tda_assets.io.storage import Storage

BATCH_PREFIX = "batch-"  # a `query_batches` partition key: `batch-<digest>`
QUERIES_TAG = "tda/queries"  # a batch run's tag: its query ids, comma-separated (in-flight and attempt counts read it)


def batch_key(query_ids: list[str]) -> str:
    """The partition key of a batch: a digest of its sorted query ids (order and repeats do not matter)."""
    ids = sorted(set(query_ids))
    return BATCH_PREFIX + hashlib.sha256("\n".join(ids).encode()).hexdigest()[:16]


def write_batch(root: Storage, query_ids: list[str]) -> str:
    """Record a batch's query ids in the root (atomically; the same ids rewrite the same file); its partition key."""
    ids = sorted({check_query_id(q) for q in query_ids})
    if not ids:
        raise ValueError("a query batch needs at least one query id")
    partition = batch_key(ids)
    root.write_bytes(key("query_batch", batch_id=partition), json.dumps({"query_ids": ids}).encode())
    return partition


def read_batch(root: Storage, partition: str) -> list[str]:
    """The query ids of batch `partition`; FileNotFoundError naming the file and the fix when the root lacks it."""
    k = key("query_batch", batch_id=partition)
    if not root.exists(k):
        raise FileNotFoundError(
            f"batch {partition!r} has no query list at {root.uri(k)}: the inbox sensor writes it when it requests "
            "the batch's run; let the sensor request a new batch instead of launching this partition by hand"
        )
    return [check_query_id(q) for q in json.loads(root.read_bytes(k))["query_ids"]]


def batch_tag(query_ids: list[str]) -> str:
    """The QUERIES_TAG value of a batch run."""
    return ",".join(sorted(query_ids))


def queries_of_tag(value: str) -> list[str]:
    """The query ids a QUERIES_TAG value names."""
    return [q for q in value.split(",") if q]
