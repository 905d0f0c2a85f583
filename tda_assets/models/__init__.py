"""Models: the embedded default and Stable Audio adapters, model folders, sources, sampling (no Dagster)."""
