"""The code location: every asset, check, job, sensor and resource of tda (loaded by workspace.yaml)."""

import os

from dagster import Definitions, EnvVar, ExecutorDefinition, in_process_executor, load_asset_checks_from_modules, multiprocess_executor

from resources import (
    ComputeResource,
    LossProtocolResource,
    ModelSourceResource,
    QueryEngineResource,
    StorageResource,
    default_storage_url,
)

from . import checks, corpus_assets, evaluation_assets, model_assets, query_assets, report_assets
from .sensors import attribute_query_job, query_inbox_sensor

ASSETS = [
    corpus_assets.training_manifest,
    corpus_assets.training_features,
    model_assets.checkpoint,
    model_assets.fisher_diagonal,
    model_assets.baseline_losses,
    query_assets.query_clips,
    query_assets.unlearned_model,
    query_assets.unlearned_losses,
    query_assets.attribution_scores,
    query_assets.similarity_scores,
    report_assets.consistency_report,
    evaluation_assets.counterfactual,
]


def _env_or_none(name: str) -> EnvVar | None:
    return EnvVar(name) if os.environ.get(name) else None


def build_resources(storage_url: str | None = None) -> dict:
    """Resources from the environment: TDA_STORAGE_URL, AWS_ENDPOINT_URL, TDA_CHECKPOINT, HF_TOKEN, TDA_MODEL_CACHE, TDA_DEVICE, TDA_DRAWS."""
    storage = StorageResource(url=storage_url or default_storage_url(), endpoint_url=_env_or_none("AWS_ENDPOINT_URL"))
    return {
        "storage": storage,
        "query_engine": QueryEngineResource(storage=storage),
        "model_source": ModelSourceResource(
            source=os.environ.get("TDA_CHECKPOINT", "embedded"),
            hf_token=_env_or_none("HF_TOKEN"),
            cache_dir=os.environ.get("TDA_MODEL_CACHE") or None,
            train_steps=int(os.environ.get("TDA_TRAIN_STEPS", "1000")),
        ),
        "compute": ComputeResource(device=os.environ.get("TDA_DEVICE", "auto"),
                                   batch_size=int(os.environ.get("TDA_BATCH_SIZE", "256"))),
        "protocol": LossProtocolResource(draws=int(os.environ.get("TDA_DRAWS", "16")), seed=int(os.environ.get("TDA_PROTOCOL_SEED", "0"))),
    }


def build_executor(kind: str | None = None) -> ExecutorDefinition:
    """`TDA_EXECUTOR`: `in_process` (default), `multiprocess`, or `k8s` (dagster-k8s `k8s_job_executor`)."""
    kind = kind or os.environ.get("TDA_EXECUTOR", "in_process")
    if kind == "in_process":
        return in_process_executor
    if kind == "multiprocess":
        return multiprocess_executor
    if kind == "k8s":
        from dagster_k8s import k8s_job_executor

        return k8s_job_executor
    raise ValueError(f"TDA_EXECUTOR={kind!r}: use in_process, multiprocess or k8s")


def build_definitions(storage_url: str | None = None, executor: str | None = None) -> Definitions:
    """The full Definitions (tests build it with a temporary storage root and each executor)."""
    return Definitions(
        assets=ASSETS,
        asset_checks=load_asset_checks_from_modules([checks]),
        jobs=[attribute_query_job],
        sensors=[query_inbox_sensor],
        resources=build_resources(storage_url),
        executor=build_executor(executor),
    )


defs = build_definitions()
