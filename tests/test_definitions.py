"""The code location loads (every executor), and the asset graph is the one of DESIGN §2."""

import pytest
from dagster import AssetKey, Definitions
from dagster_k8s.job import get_user_defined_k8s_config

from tda_assets.definitions import build_definitions

GPU_ASSETS = [
    "training_features",
    "checkpoint",
    "fisher_diagonal",
    "baseline_losses",
    "query_clips",
    "unlearned_model",
    "unlearned_losses",
    "similarity_scores",
    "training_gradients",
    "training_embeddings",
]


@pytest.mark.parametrize("executor", ["in_process", "multiprocess", "k8s"])
def test_definitions_load_with_each_executor(executor, tmp_path):
    defs = build_definitions(str(tmp_path), executor)
    Definitions.validate_loadable(defs)
    for name in ("query_clip", "attribute_config"):
        assert defs.resolve_job_def(name).executor_def.name == executor


def test_lineage_runs_checkpoint_to_baseline_to_unlearned_to_attribution(tmp_path):
    graph = build_definitions(str(tmp_path)).resolve_asset_graph()
    parents = lambda name: {k.to_user_string() for k in graph.get(AssetKey(name)).parent_keys}  # noqa: E731
    assert "checkpoint" in parents("baseline_losses")
    assert {"query_clips", "fisher_diagonal"} <= parents("unlearned_model")
    assert "unlearned_model" in parents("unlearned_losses")
    assert {"unlearned_losses", "baseline_losses"} <= parents("attribution_scores")
    assert {"checkpoint", "fisher_diagonal", "training_features"} <= parents("training_gradients")
    assert "training_gradients" in parents("attribution_scores")  # method linearized
    assert {"similarity_scores", "training_gradients"} <= parents("unlearned_losses")  # two_stage's cheap signals
    assert parents("training_embeddings") == {"checkpoint", "training_features"}
    assert "training_embeddings" in parents("similarity_scores")


def test_gpu_assets_carry_the_gpu_pool_and_k8s_gpu_request(tmp_path):
    graph = build_definitions(str(tmp_path), "k8s").resolve_asset_graph()
    for name in GPU_ASSETS:
        node = graph.get(AssetKey(name))
        op = node.assets_def.node_def
        assert op.pool == "gpu", name
        k8s = get_user_defined_k8s_config(op.tags)  # what k8s_job_executor puts on the step pod
        assert k8s.container_config["resources"]["limits"]["nvidia.com/gpu"] == "1", name


def test_partitions_are_shards_queries_and_query_by_config(tmp_path):
    graph = build_definitions(str(tmp_path)).resolve_asset_graph()
    for name in ("training_features", "baseline_losses", "training_embeddings"):
        assert graph.get(AssetKey(name)).partitions_def.get_partition_keys()[0] == "shard-00", name
    assert (
        graph.get(AssetKey("training_gradients")).partitions_def
        == graph.get(AssetKey("baseline_losses")).partitions_def
    )
    assert graph.get(AssetKey("query_clips")).partitions_def.name == "queries"
    for name in ("unlearned_model", "unlearned_losses", "attribution_scores"):
        dims = {d.name: d.partitions_def.name for d in graph.get(AssetKey(name)).partitions_def.partitions_defs}
        assert dims == {"query": "queries", "config": "configs"}, name


def test_runner_sets_the_console_log_level_also_for_a_run_config_object():
    from dagster import RunConfig

    from tda_assets.experiments.runner import with_console_level

    level = {"console": {"config": {"log_level": "WARNING"}}}
    assert with_console_level(RunConfig(ops={"a": {"config": {}}}), "WARNING")["loggers"] == level
    assert with_console_level({"ops": {}}, "WARNING")["loggers"] == level
    own = {"loggers": {"console": {"config": {"log_level": "DEBUG"}}}}
    assert with_console_level(own, "WARNING") == own
