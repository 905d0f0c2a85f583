"""Op tags and pools shared by the assets that run on a GPU executor."""

GPU_POOL = "gpu"
GPU_OP_TAGS = {
    "dagster-k8s/config": {
        "container_config": {"resources": {"limits": {"nvidia.com/gpu": "1"}, "requests": {"nvidia.com/gpu": "1"}}},
        "pod_spec_config": {"node_selector": {"nvidia.com/gpu.present": "true"}},
    }
}
GPU = {"pool": GPU_POOL, "op_tags": GPU_OP_TAGS}
