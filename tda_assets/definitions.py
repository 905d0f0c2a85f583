"""The code location: every asset, check, job, sensor and resource of tda (loaded by workspace.yaml)."""

from dagster import (
    Definitions,
    ExecutorDefinition,
    in_process_executor,
    load_asset_checks_from_modules,
    load_assets_from_package_module,
    multiprocess_executor,
)

from resources import build_resources
from resources.env import Env
from tda_assets.defs import assets as asset_modules
from tda_assets.defs import checks
from tda_assets.defs.sensors import attribute_config_job, query_batch_job, query_clip_job, query_inbox_sensor


def all_assets() -> list:
    """Every asset of the `defs/assets` package, discovered (no list kept by hand)."""
    return list(load_assets_from_package_module(asset_modules))


def all_checks() -> list:
    """Every standalone asset check (`defs/checks.py`); checks declared on assets come with their asset."""
    return list(load_asset_checks_from_modules([checks]))


def build_executor(kind: str) -> ExecutorDefinition:
    """`in_process` (default), `multiprocess`, or `k8s` (dagster-k8s `k8s_job_executor`)."""
    if kind == "in_process":
        return in_process_executor
    if kind == "multiprocess":
        return multiprocess_executor
    if kind == "k8s":
        from dagster_k8s import k8s_job_executor

        return k8s_job_executor
    raise ValueError(f"TDA_EXECUTOR={kind!r}: use in_process, multiprocess or k8s")


def build_definitions(
    storage_url: str | None = None, executor: str | None = None, env: Env | None = None
) -> Definitions:
    """The full Definitions from the environment (tests pass a temporary storage root and each executor)."""
    env = (env or Env.read()).with_storage(storage_url)
    return Definitions(
        assets=all_assets(),
        asset_checks=all_checks(),
        jobs=[query_clip_job, attribute_config_job, query_batch_job],
        sensors=[query_inbox_sensor],
        resources=build_resources(env),
        executor=build_executor(executor or env.executor),
    )


defs = build_definitions()


def from_environment() -> Definitions:
    """The Definitions rebuilt from the environment as it is now (storage root, executor, …): what the runs of a
    non-in-process executor load in each of their processes."""
    return build_definitions()
