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
    """How many new inbox queries one sensor tick requests, and where a query's clip may come from.

    A query's `audio_uri` must lie under the storage root, the training manifest's folder (`manifest_uri`) or one
    of `allowed_audio_roots` (TDA_ALLOWED_AUDIO_ROOTS: folders or s3:// prefixes).
    """

    max_queries_per_tick: int = 10
    allowed_audio_roots: list[str] = []
    manifest_uri: str | None = None

    def audio_roots(self) -> list[str]:
        """The roots besides the storage root a query's clip may come from."""
        return audio_roots(self.manifest_uri, self.allowed_audio_roots)

    def allowed_roots(self, storage: Storage) -> list[str]:
        """Every root a query's clip may come from in `storage`: these and the root's own (`allowed_audio_roots`)."""
        return allowed_audio_roots(storage, self.audio_roots())
