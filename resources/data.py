"""What comes in: where the training manifest comes from, and how fast the query inbox is drained (Dagster
resources)."""

from dagster import ConfigurableResource

from tda_assets.data.inbox import allowed_audio_roots, audio_roots
from tda_assets.io.storage import Storage


class TrainingDataResource(ConfigurableResource):
    """Where the training manifest comes from: a user's CSV/parquet (`manifest_uri`) or the embedded corpus."""

    manifest_uri: str | None = None
    clips_per_artist: int = 40


class InboxResource(ConfigurableResource):
    """How many new inbox queries one sensor tick requests (runs per tick; past `max_query_partitions` query partitions,
    runs of `queries_per_batch` queries each), and where a query's clip may come from.

    A query's `audio_uri` must lie under the storage root, the training manifest's folder (`manifest_uri`) or one
    of `allowed_audio_roots` (TDA_ALLOWED_AUDIO_ROOTS: folders or s3:// prefixes).
    """

    max_queries_per_tick: int = 10
    max_query_partitions: int = 10_000  # TDA_MAX_QUERY_PARTITIONS: past it, new queries run in batches
    queries_per_batch: int = 100  # TDA_QUERIES_PER_BATCH: queries in one `query_batch` run
    allowed_audio_roots: list[str] = []
    manifest_uri: str | None = None

    def audio_roots(self) -> list[str]:
        """The roots besides the storage root a query's clip may come from."""
        return audio_roots(self.manifest_uri, self.allowed_audio_roots)

    def allowed_roots(self, root: Storage) -> list[str]:
        """Every root a query's clip may come from in `root`: these and the root's own (`allowed_audio_roots`)."""
        return allowed_audio_roots(root, self.audio_roots())
