"""Keys of the tables and files under the storage root (DESIGN §3), in one place."""

from __future__ import annotations

PART = "part-0.parquet"


def manifest() -> str:
    return f"training_manifest/{PART}"


def corpus_audio(artist: str, item_id: str) -> str:
    return f"corpus/{artist}/{item_id}.wav"


def features(shard: str) -> str:
    return f"training_features/shard={shard}/features.safetensors"


def checkpoint_pointer() -> str:
    return "checkpoint/current.json"


def checkpoint_folder(checkpoint_id: str) -> str:
    return f"checkpoint/{checkpoint_id}"


def fisher(checkpoint_id: str, protocol_id: str) -> str:
    return f"fisher_diagonal/checkpoint_id={checkpoint_id}/protocol_id={protocol_id}/fisher.safetensors"


def baseline_losses(shard: str) -> str:
    return f"baseline_losses/shard={shard}/{PART}"


def inbox() -> str:
    return "inbox"


def query_row(query_id: str) -> str:
    return f"queries/query_id={query_id}/{PART}"


def query_clip(query_id: str, name: str) -> str:
    return f"query_clips/query_id={query_id}/{name}"


def config_row(config_id: str) -> str:
    return f"unlearning_configs/config_id={config_id}/{PART}"


def per_query_config(table: str, query_id: str, config_id: str, name: str = PART) -> str:
    return f"{table}/query_id={query_id}/config_id={config_id}/{name}"


def similarity(query_id: str, method: str) -> str:
    return f"similarity_scores/query_id={query_id}/method={method}/{PART}"


def consistency() -> str:
    return f"consistency/{PART}"


def counterfactual() -> str:
    return f"counterfactual/{PART}"


def plot(kind: str, name: str) -> str:
    return f"plots/{kind}/{name}.png"
