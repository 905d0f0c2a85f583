"""The Kubernetes Jobs k8s_job_executor would submit for a GPU step (`unlearned_losses`) and a CPU step
(`attribution_scores`) of the query job, rendered with dagster-k8s's own builders from deploy/values.yaml."""

from __future__ import annotations

import base64
import json
import re
import zlib

import pytest
import yaml
from dagster._grpc.types import ExecuteStepArgs
from dagster._serdes import deserialize_value

from resources.env import REPO_ROOT
from tda_assets.defs.k8s import load_values, main, step_job

IMAGE = "registry.example.com/tda/tda-gpu:0.1.0"
SECRETS = {
    "AWS_ACCESS_KEY_ID": ("tda-aws", "access-key-id"),
    "AWS_SECRET_ACCESS_KEY": ("tda-aws", "secret-access-key"),
    "HF_TOKEN": ("tda-hf", "token"),
    "DAGSTER_PG_PASSWORD": ("dagster-postgresql-secret", "postgresql-password"),
}


@pytest.fixture(scope="module")
def jobs(tmp_path_factory) -> dict[str, dict]:
    from tda_assets.definitions import build_definitions

    defs = build_definitions(str(tmp_path_factory.mktemp("storage")), "k8s")
    return {asset: step_job(asset, defs=defs) for asset in ("unlearned_losses", "attribution_scores")}


def container(job: dict) -> dict:
    [only] = job["spec"]["template"]["spec"]["containers"]
    return only


def env_of(job: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container(job)["env"]}


def test_gpu_step_requests_and_limits_one_gpu_on_a_gpu_node(jobs):
    job = jobs["unlearned_losses"]
    resources = container(job)["resources"]
    assert resources["requests"]["nvidia.com/gpu"] == "1"
    assert resources["limits"]["nvidia.com/gpu"] == "1"
    pod = job["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]


def test_cpu_step_asks_for_no_gpu_and_keeps_the_deployment_resources(jobs):
    job = jobs["attribution_scores"]
    assert "nvidia.com/gpu" not in json.dumps(job)
    assert (
        "tolerations" not in job["spec"]["template"]["spec"] and "nodeSelector" not in job["spec"]["template"]["spec"]
    )
    deployment = load_values()["dagster-user-deployments"]["deployments"][0]
    assert (
        container(job)["resources"]
        == deployment["resources"]
        == {"requests": {"cpu": "1", "memory": "4Gi"}, "limits": {"memory": "8Gi"}}
    )


@pytest.mark.parametrize("asset", ["unlearned_losses", "attribution_scores"])
def test_step_pod_runs_the_deployment_image_and_executes_its_own_step(jobs, asset):
    job = jobs[asset]
    assert container(job)["image"] == IMAGE
    assert container(job)["args"] == ["dagster", "api", "execute_step"]
    env = env_of(job)
    compressed = env["DAGSTER_COMPRESSED_EXECUTE_STEP_ARGS"]["value"]
    step_args = deserialize_value(zlib.decompress(base64.b64decode(compressed)).decode(), ExecuteStepArgs)
    assert step_args.step_keys_to_execute == [asset]
    assert step_args.job_origin.job_name == "attribute_config"
    assert step_args.job_origin.repository_origin.container_image == IMAGE
    assert job["metadata"]["labels"]["dagster/op"] == asset and job["metadata"]["namespace"] == "tda"


@pytest.mark.parametrize("asset", ["unlearned_losses", "attribution_scores"])
def test_step_environment_has_the_storage_url_and_the_k8s_executor(jobs, asset):
    env = env_of(jobs[asset])
    assert env["TDA_STORAGE_URL"] == {"name": "TDA_STORAGE_URL", "value": "s3://tda-artifacts/tda"}
    assert env["TDA_EXECUTOR"]["value"] == "k8s"
    assert env["DAGSTER_HOME"]["value"] == "/opt/dagster/dagster_home"


@pytest.mark.parametrize("asset", ["unlearned_losses", "attribution_scores"])
def test_credentials_come_from_secrets_never_as_literal_values(jobs, asset):
    env = env_of(jobs[asset])
    for name, (secret, key) in SECRETS.items():
        assert "value" not in env[name], name
        assert env[name]["valueFrom"] == {"secretKeyRef": {"name": secret, "key": key}}, name
    literal = {e["name"] for e in env.values() if "value" in e}
    assert not {n for n in literal if re.search(r"SECRET|TOKEN|PASSWORD|ACCESS_KEY", n)}


def test_values_hold_no_literal_credential():
    text = (REPO_ROOT / "deploy" / "values.yaml").read_text()
    env = yaml.safe_load(text)["dagster-user-deployments"]["deployments"][0]["env"]
    assert {e["name"] for e in env if "valueFrom" in e} == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "HF_TOKEN"}
    assert "postgresqlPassword" not in text


def test_gpu_image_installs_the_cuda_build_of_the_makefile_s_torch():
    dockerfile = (REPO_ROOT / "deploy" / "Dockerfile.gpu").read_text()
    makefile = (REPO_ROOT / "Makefile").read_text()
    torch = re.search(r"^TORCH_VERSION \?= (\S+)", makefile, re.M).group(1)
    assert re.search(rf"^ARG TORCH_VERSION={re.escape(torch)}$", dockerfile, re.M)
    assert 'pip install "torch==${TORCH_VERSION}"' in dockerfile
    assert "download.pytorch.org/whl/cpu" not in dockerfile and "+cpu" not in dockerfile


def test_the_module_prints_the_step_job_as_yaml(capsys):
    assert main(["attribution_scores"]) == 0
    [printed] = [d for d in yaml.safe_load_all(capsys.readouterr().out) if d]
    assert printed["kind"] == "Job" and printed["metadata"]["labels"]["dagster/op"] == "attribution_scores"


def test_an_unknown_asset_names_the_steps_of_the_job(jobs):
    with pytest.raises(KeyError, match=r"'checkpoint' is no step of job 'attribute_config'.*unlearned_losses"):
        step_job("checkpoint")
