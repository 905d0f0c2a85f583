"""Data: the embedded corpus, user manifests, audio decoding and the query inbox (no Dagster)."""
