"""Saving and loading models in the diffusers `save_pretrained` layout, with the adapter chosen from the folder."""

from __future__ import annotations

import json
from pathlib import Path

from diffusers import StableAudioDiTModel

from tda_assets.attribution.adapter import DiTAdapter
from tda_assets.attribution.errors import ModelSourceError
from tda_assets.attribution.objective import DiffusionObjective
from tda_assets.models.sampling import default_scheduler

TDA_MODEL_FILE = "tda_model.json"


def save_model(adapter: DiTAdapter, folder: str | Path, extra: dict | None = None) -> Path:
    """Write `transformer/`, `scheduler/` and `tda_model.json` (which adapter reads the folder) into `folder`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if hasattr(adapter, "save_pretrained"):  # a full pipeline folder (stable_audio): load_model reads model_index.json
        adapter.save_pretrained(folder)
        return folder
    adapter.denoiser.save_pretrained(folder / "transformer")
    default_scheduler().save_pretrained(folder / "scheduler")
    config = {**adapter.folder_config(), **(extra or {})}
    (folder / TDA_MODEL_FILE).write_text(json.dumps(config, indent=2, sort_keys=True))
    return folder


def read_model_info(folder: str | Path) -> dict:
    """The folder's tda_model.json, or a description of a diffusers Stable Audio pipeline folder."""
    folder = Path(folder)
    if (folder / TDA_MODEL_FILE).is_file():
        return json.loads((folder / TDA_MODEL_FILE).read_text())
    index = folder / "model_index.json"
    if index.is_file():
        cls = json.loads(index.read_text()).get("_class_name")
        if cls == "StableAudioPipeline":
            return {"kind": "stable_audio"}
        raise ModelSourceError(
            f"model folder {folder} holds a diffusers {cls}, not a text-to-music model tda can attribute; "
            "point the checkpoint at a StableAudioPipeline folder or a tda embedded model"
        )
    raise ModelSourceError(
        f"{folder} is not a model folder: it has neither {TDA_MODEL_FILE} nor model_index.json "
        "(expected the diffusers save_pretrained layout)"
    )


def load_model(folder: str | Path, denoiser: bool = True) -> DiTAdapter:
    """The adapter for a model folder: `embedded` (tda_model.json) or `stable_audio` (model_index.json).

    `denoiser=False`: a step that only encodes needs no DiT weights; a Stable Audio folder then loads its encoders only
    (the embedded denoiser, 1.25 M parameters, is loaded either way)."""
    folder = Path(folder)
    info = read_model_info(folder)
    if info["kind"] == "embedded":
        from .embedded.mel import MelFrontend
        from .embedded.model import EmbeddedAdapter

        denoiser = StableAudioDiTModel.from_pretrained(folder / "transformer").eval()
        frontend = MelFrontend(
            **{"peak": None, **info["frontend"]}
        )  # folders saved before `peak` existed kept the level
        return EmbeddedAdapter(
            denoiser=denoiser,
            objective=DiffusionObjective(**info["objective"]),
            sample_rate=frontend.sample_rate,
            frontend=frontend,
        )
    if info["kind"] == "stable_audio":
        from .stable_audio import StableAudioAdapter

        return StableAudioAdapter.from_pretrained(folder, denoiser=denoiser)
    raise ModelSourceError(f"model folder {folder}: unknown kind {info['kind']!r} in {TDA_MODEL_FILE}")
