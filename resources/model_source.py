"""The checkpoint to attribute, as a Dagster resource over the plain `ModelSource`."""

from dagster import ConfigurableResource, EnvVar
from pydantic import Field

from tda_assets.models.sources import ModelSource

from .env import hub_cache, hub_offline


class ModelSourceResource(ConfigurableResource):
    """`embedded` (trained by the `checkpoint` asset), a folder, `s3://…` or `hf://repo@rev`."""

    source: str = "embedded"
    hf_token: str | None = None
    cache_dir: str | None = Field(
        default=None,
        description="local folder for model files: the hub cache, and copies of S3 model folders under "
        "tda-models/ (default: HF_HOME's hub cache and the temp folder; TDA_MODEL_CACHE)",
    )
    train_steps: int = 1000
    train_seed: int = 0

    def model_source(self) -> ModelSource:
        """The plain source the lower layers take (the hub's cache variables read now, as huggingface_hub does)."""
        token = self.hf_token.get_value() if isinstance(self.hf_token, EnvVar) else self.hf_token
        return ModelSource(
            self.source,
            token,
            self.cache_dir,
            hub_cache(self.cache_dir),
            hub_offline(),
            self.train_steps,
            self.train_seed,
        )
