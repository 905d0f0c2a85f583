"""Op tags and pools shared by the assets that run on a GPU executor.

On Kubernetes (`TDA_EXECUTOR=k8s`) the `dagster-k8s/config` tag becomes the step pod's spec: one `nvidia.com/gpu`
requested and limited, a GPU node chosen and its taint tolerated. Its `resources` replace the deployment's (dagster-k8s
merges container settings key by key), so they also hold the host CPU and memory a GPU step needs; tune them per node
type. `python -m tda_assets.defs.k8s <asset>` shows the Job a step gets.
"""

GPU_POOL = "gpu"
GPU_RESOURCES = {
    "requests": {"cpu": "4", "memory": "32Gi", "nvidia.com/gpu": "1"},
    "limits": {"memory": "64Gi", "nvidia.com/gpu": "1"},
}
GPU_OP_TAGS = {
    "dagster-k8s/config": {
        "container_config": {"resources": GPU_RESOURCES},
        "pod_spec_config": {
            "node_selector": {"nvidia.com/gpu.present": "true"},
            "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        },
    }
}
GPU = {"pool": GPU_POOL, "op_tags": GPU_OP_TAGS}
