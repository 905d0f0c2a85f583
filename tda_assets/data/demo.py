"""The demo's built-in queries: one prompt per artist of the embedded corpus, written from that artist's style."""

from __future__ import annotations

from tda_assets.io.storage import Storage

from .corpus import ARTISTS, style_prompt
from .inbox import add_query


def builtin_queries(root: Storage, artists: int | None = None) -> list[str]:
    """Drop one query per artist into the inbox (`demo-artist-NN`, its target artist recorded); returns their ids."""
    ids = []
    for i, style in enumerate(ARTISTS[:artists] if artists else ARTISTS):
        ids.append(
            add_query(
                root,
                style_prompt(style),
                f"demo-{style.name.replace('_', '-')}",
                seed=100 + i,
                target_artist=style.name,
            ).query_id
        )
    return ids
