"""What comes in: where the training manifest comes from, and how fast the query inbox is drained (Dagster resources)."""

from dagster import ConfigurableResource


class TrainingDataResource(ConfigurableResource):
    """Where the training manifest comes from: a user's CSV/parquet (`manifest_uri`) or the embedded corpus."""

    manifest_uri: str | None = None
    clips_per_artist: int = 40


class InboxResource(ConfigurableResource):
    """How many new inbox queries one sensor tick requests."""

    max_queries_per_tick: int = 10
