"""Partitions of DESIGN §2: static training shards and dynamic queries (keys are safe slugs)."""

from __future__ import annotations

import hashlib
import os
import re

from dagster import DynamicPartitionsDefinition, StaticPartitionsDefinition

N_SHARDS = int(os.environ.get("TDA_SHARDS", "4"))
SHARD_KEYS = [f"shard-{i:02d}" for i in range(N_SHARDS)]
training_shards = StaticPartitionsDefinition(SHARD_KEYS)
queries = DynamicPartitionsDefinition(name="queries")

_SLUG = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")


def shard_of(item_id: str, n_shards: int = N_SHARDS) -> str:
    """The shard a training item belongs to: a stable hash of its id (any machine, any order)."""
    h = int.from_bytes(hashlib.blake2b(item_id.encode(), digest_size=4).digest(), "little")
    return f"shard-{h % n_shards:02d}"


def slugify(text: str) -> str:
    """A safe partition key from any text: lowercase letters, digits, `-` and `_`, at most 64 characters."""
    slug = re.sub(r"[^a-z0-9_]+", "-", text.lower()).strip("-_")[:64].strip("-_")
    if not slug:
        raise ValueError(f"cannot make a query id from {text!r}: use letters or digits")
    return slug


def check_slug(key: str, what: str = "query id") -> str:
    """Refuse keys that are not safe slugs (a `/`, `|`, `,` or space would break paths and partition keys)."""
    if not _SLUG.match(key):
        example = slugify(key) if re.search("[A-Za-z0-9]", key) else f"my-{what.split()[0]}"
        raise ValueError(f"{what} {key!r} is not a safe slug: use [a-z0-9_-], at most 64 characters (e.g. {example!r})")
    return key


def check_query_id(query_id: str) -> str:
    """A query id that is a safe slug (see `check_slug`)."""
    return check_slug(query_id, "query id")
