"""Every resource of the code location, from one `Env` (the only place settings meet Dagster)."""

from dagster import EnvVar

from .compute import ComputeResource, LossProtocolResource
from .data import InboxResource, TrainingDataResource
from .env import Env, has
from .model_source import ModelSourceResource
from .storage import StorageResource


def build_resources(env: Env) -> dict:
    """The resources: storage root, model source, compute, loss protocol, training data, inbox."""
    storage = StorageResource(
        url=env.storage_url, endpoint_url=EnvVar("AWS_ENDPOINT_URL") if env.aws_endpoint_url else None
    )
    return {
        "storage": storage,
        "model_source": ModelSourceResource(
            source=env.checkpoint,
            hf_token=EnvVar("HF_TOKEN") if has("HF_TOKEN") else None,
            cache_dir=env.model_cache,
            train_steps=env.train_steps,
        ),
        "compute": ComputeResource(device=env.device, batch_size=env.batch_size, grad_rows=env.grad_rows),
        "protocol": LossProtocolResource(draws=env.draws, seed=env.protocol_seed, precision=env.loss_precision),
        "training_data": TrainingDataResource(manifest_uri=env.manifest, clips_per_artist=env.clips_per_artist),
        "inbox": InboxResource(
            max_queries_per_tick=env.max_queries_per_tick,
            max_query_partitions=env.max_query_partitions,
            queries_per_batch=env.queries_per_batch,
            allowed_audio_roots=list(env.allowed_audio_roots),
            manifest_uri=env.manifest,
        ),
    }
