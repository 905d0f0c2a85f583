"""What `k8s_job_executor` submits for one step: the Kubernetes Job of the step's pod, rendered with dagster-k8s's own
builders from the Helm values in `deploy/values.yaml` — no cluster needed, so GPU requests, image and environment can
be reviewed (and tested) before a deployment.

The layers are merged as the executor merges them (`K8sStepHandler._get_container_context` and `launch_step`): the
run launcher's settings, then the container context the Dagster chart hands to runs of the user-code deployment
(`dagsterUserDeployments.k8sContainerContext`), then the step's `dagster-k8s/config` op tags
(`tda_assets/defs/tags.py`).

    python -m tda_assets.defs.k8s unlearned_losses     # prints the step Job as YAML
"""

from __future__ import annotations

import sys
import uuid
from pathlib import Path
from typing import Any, Mapping

import kubernetes.client
import yaml
from dagster import Definitions
from dagster._core.definitions.reconstruct import ReconstructableRepository
from dagster._core.execution.api import create_execution_plan
from dagster._grpc.types import ExecuteStepArgs
from dagster_k8s import DagsterK8sJobConfig, construct_dagster_k8s_job
from dagster_k8s.container_context import K8sContainerContext
from dagster_k8s.job import get_k8s_job_name, get_user_defined_k8s_config

from resources.env import REPO_ROOT

VALUES = REPO_ROOT / "deploy" / "values.yaml"
CODE_LOCATION = "tda_assets.definitions"  # what the deployment's `dagster api grpc -m …` serves
CHART_DEFAULTS = {"dagsterHome": "/opt/dagster/dagster_home", "postgresqlSecretName": "dagster-postgresql-secret"}


def load_values(path: Path = VALUES) -> dict:
    """The Helm values (the Dagster chart's, with its `dagster-user-deployments` section)."""
    return yaml.safe_load(path.read_text())


def user_deployment(values: Mapping[str, Any], name: str | None = None) -> Mapping[str, Any]:
    """The user-code deployment `name` (default: the first) of the values."""
    deployments = values.get("dagster-user-deployments", {}).get("deployments") or []
    for deployment in deployments:
        if name is None or deployment["name"] == name:
            return deployment
    raise KeyError(
        f"no user-code deployment {name!r} under dagster-user-deployments.deployments in the Helm values; "
        f"have {[d['name'] for d in deployments]}"
    )


def image_of(deployment: Mapping[str, Any]) -> str:
    """`repository:tag`, as the chart passes it to the code server (DAGSTER_CURRENT_IMAGE) and so to every step pod."""
    image = deployment["image"]
    if not image.get("tag"):
        raise ValueError(
            f"deployment {deployment['name']!r} has no image tag: pin one (step pods must run the same image)"
        )
    return f"{image['repository']}:{image['tag']}"


def _global(values: Mapping[str, Any], key: str) -> str:
    return (values.get("global") or {}).get(key) or values.get(key) or CHART_DEFAULTS[key]


def fullname(values: Mapping[str, Any], release: str, chart: str) -> str:
    """The chart's `dagster.fullname`: the override, else the release name if it contains the chart's, else both."""
    override = (values.get("global") or {}).get("fullnameOverride") or values.get("fullnameOverride")
    return (override or (release if chart in release else f"{release}-{chart}"))[:63].rstrip("-")


def chart_container_context(
    values: Mapping[str, Any], release: str, namespace: str, deployment: Mapping[str, Any]
) -> dict:
    """The container context the chart gives runs launched from `deployment` (its k8sContainerContext helper)."""
    name = fullname(values, release, "dagster-user-deployments")
    k8s: dict[str, Any] = {
        "image_pull_policy": deployment["image"].get("pullPolicy"),
        "env_config_maps": [
            f"{name}-{deployment['name']}-user-env",
            *[m["name"] for m in deployment.get("envConfigMaps") or [] if "name" in m],
        ],
        "namespace": namespace,
        "service_account_name": (values.get("global") or {}).get("serviceAccountName") or f"{name}-user-deployments",
    }
    optional = {
        "env_secrets": [s["name"] for s in deployment.get("envSecrets") or [] if "name" in s],
        "image_pull_secrets": values.get("imagePullSecrets"),
        "volume_mounts": deployment.get("volumeMounts"),
        "volumes": deployment.get("volumes"),
        "labels": deployment.get("labels"),
        "resources": deployment.get("resources"),
        "env": deployment.get("env") if isinstance(deployment.get("env"), list) else None,
    }
    k8s.update({k: v for k, v in optional.items() if v})
    return {"k8s": k8s}


def run_launcher_context(values: Mapping[str, Any], release: str) -> K8sContainerContext:
    """The K8sRunLauncher's part (chart `runLauncher.config.k8sRunLauncher`), which step pods inherit first."""
    launcher = ((values.get("runLauncher") or {}).get("config") or {}).get("k8sRunLauncher") or {}
    names = lambda items: [i["name"] if isinstance(i, dict) else i for i in items or [] if i]  # noqa: E731
    return K8sContainerContext(
        env_config_maps=[f"{fullname(values, release, 'dagster')}-pipeline-env", *names(launcher.get("envConfigMaps"))],
        env_secrets=names(launcher.get("envSecrets")),
        namespace=launcher.get("jobNamespace") or None,
    )


def step_job(
    asset: str,
    values: Mapping[str, Any] | None = None,
    defs: Definitions | None = None,
    job: str = "attribute_config",
    release: str = "tda",
    namespace: str = "tda",
) -> dict:
    """The Kubernetes Job k8s_job_executor would create for the step of `asset` in `job`, as `kubectl … -o yaml`
    shows it."""
    from tda_assets.definitions import build_definitions

    values = values if values is not None else load_values()
    deployment = user_deployment(values)
    image = image_of(deployment)
    job_def = (defs or build_definitions(executor="k8s")).resolve_job_def(job)
    steps = {s.key: s for s in create_execution_plan(job_def).steps}
    if asset not in steps:
        raise KeyError(f"{asset!r} is no step of job {job!r}; its steps: {sorted(steps)}")
    run_context = chart_container_context(values, release, namespace, deployment)
    context = (
        run_launcher_context(values, release)
        .merge(K8sContainerContext.create_from_config(run_context))
        .merge(K8sContainerContext(run_k8s_config=get_user_defined_k8s_config(steps[asset].tags or {})))
    )
    job_config = DagsterK8sJobConfig(
        job_image=image,
        dagster_home=_global(values, "dagsterHome"),
        instance_config_map=f"{fullname(values, release, 'dagster')}-instance",
        postgres_password_secret=_global(values, "postgresqlSecretName"),
    )
    origin = ReconstructableRepository.for_module(
        CODE_LOCATION, "defs", working_directory=str(REPO_ROOT), container_image=image, container_context=run_context
    )
    run_id = str(uuid.uuid4())
    step_args = ExecuteStepArgs(origin.get_reconstructable_job(job).get_python_origin(), run_id, [asset])
    name = f"dagster-step-{get_k8s_job_name(run_id, asset)}"
    body = construct_dagster_k8s_job(
        job_config=job_config,
        args=step_args.get_command_args(skip_serialized_namedtuple=True),
        job_name=name,
        pod_name=name,
        component="step_worker",
        user_defined_k8s_config=context.run_k8s_config,
        labels={"dagster/job": job, "dagster/op": asset, "dagster/run-id": run_id},
        env_vars=[
            *step_args.get_command_env(),
            {"name": "DAGSTER_RUN_JOB_NAME", "value": job},
            {"name": "DAGSTER_RUN_STEP_KEY", "value": asset},
        ],
    )
    rendered = kubernetes.client.ApiClient().sanitize_for_serialization(body)
    rendered["metadata"]["namespace"] = context.namespace
    return rendered


def main(argv: list[str] | None = None) -> int:
    """Print the step Job of each asset named on the command line."""
    for asset in (argv if argv is not None else sys.argv[1:]) or ["unlearned_losses"]:
        print(yaml.safe_dump(step_job(asset), sort_keys=False), end="---\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
