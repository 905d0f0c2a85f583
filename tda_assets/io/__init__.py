"""Storage: the storage root, the table registry, artifacts, checkpoint records and the DuckDB query engine (no
Dagster)."""
