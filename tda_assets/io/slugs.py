"""Safe key values: query and configuration ids become folder names and Dagster partition keys."""

from __future__ import annotations

import re

_SLUG = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")


def slugify(text: str) -> str:
    """A safe key from any text: lowercase letters, digits, `-` and `_`, at most 64 characters."""
    slug = re.sub(r"[^a-z0-9_]+", "-", text.lower()).strip("-_")[:64].strip("-_")
    if not slug:
        raise ValueError(f"cannot make an id from {text!r}: use letters or digits")
    return slug


def check_slug(key: str, what: str = "query id") -> str:
    """Refuse keys that are not safe slugs (a `/`, `|`, `,` or space would break paths and partition keys)."""
    if not isinstance(key, str) or not _SLUG.match(key):
        example = slugify(key) if isinstance(key, str) and re.search("[A-Za-z0-9]", key) else f"my-{what.split()[0]}"
        raise ValueError(f"{what} {key!r} is not a safe slug: use [a-z0-9_-], at most 64 characters (e.g. {example!r})")
    return key


def check_query_id(query_id: str) -> str:
    """A query id that is a safe slug (see `check_slug`)."""
    return check_slug(query_id, "query id")
