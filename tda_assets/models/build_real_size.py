"""Stable Audio Open's published architecture with random weights, built offline from configs (DESIGN §4 "Real shapes").

The DiT is diffusers' default `StableAudioDiTModel()` (24 layers × 1536, 1.057 B parameters, 1024 latent frames of 64
channels), the VAE the default `AutoencoderOobleck()` (44.1 kHz stereo, 2048 samples a frame, so a 47.55 s window),
the text encoder a T5-base-shaped `T5EncoderModel` and the projection model Stable Audio Open's (768 → 768, 0–512 s).
The tokenizer is built offline as `StableAudioAdapter.tiny()` builds it (a word-level T5-like vocabulary), at
Stable Audio Open's 128 tokens. Weights change the answers, not the shapes, memory or time.

    python -m tda_assets.models.build_real_size <folder>     # a StableAudioPipeline folder for TDA_CHECKPOINT
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from diffusers import AutoencoderOobleck, StableAudioDiTModel, StableAudioProjectionModel
from transformers import T5Config, T5EncoderModel

from tda_assets.models.stable_audio import StableAudioAdapter, _tiny_tokenizer

MAX_TOKENS = 128  # Stable Audio Open's T5 tokenizer length
T5_BASE = dict(  # t5-base's encoder shape; the vocabulary size is T5's, whatever the offline tokenizer uses of it
    vocab_size=32128,
    d_model=768,
    d_kv=64,
    d_ff=3072,
    num_layers=12,
    num_heads=12,
    relative_attention_num_buckets=32,
    relative_attention_max_distance=128,
    feed_forward_proj="relu",
    dropout_rate=0.0,
    pad_token_id=0,
    eos_token_id=1,
    decoder_start_token_id=0,
)


def real_size_adapter(seed: int = 0, device: str | torch.device = "cpu") -> StableAudioAdapter:
    """A randomly initialised Stable Audio Open–shaped adapter, its modules built directly on `device` (fp32, eval)."""
    torch.manual_seed(seed)
    with torch.device(device):
        vae = AutoencoderOobleck()
        text_encoder = T5EncoderModel(T5Config(**T5_BASE))
        projection = StableAudioProjectionModel(text_encoder_dim=768, conditioning_dim=768, min_value=0, max_value=512)
        denoiser = StableAudioDiTModel()
    return StableAudioAdapter(
        denoiser=denoiser.eval(),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=_tiny_tokenizer(MAX_TOKENS),
        projection_model=projection,
    )


def parameter_counts(adapter: StableAudioAdapter) -> dict[str, int]:
    """Parameters per component: `transformer` (the denoiser, what is attributed), `vae`, `text_encoder`,
    `projection_model`."""
    parts = {
        "transformer": adapter.denoiser,
        "vae": adapter.vae,
        "text_encoder": adapter.text_encoder,
        "projection_model": adapter.projection_model,
    }
    return {name: sum(p.numel() for p in module.parameters()) for name, module in parts.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="where to write the StableAudioPipeline folder (about 5.6 GB)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    adapter = real_size_adapter(args.seed)
    built = time.perf_counter() - start
    adapter.save_pretrained(args.folder)
    counts = ", ".join(f"{k} {v / 1e6:,.1f} M" for k, v in parameter_counts(adapter).items())
    print(f"built in {built:.1f}s, saved to {args.folder} in {time.perf_counter() - start - built:.1f}s: {counts}")
    print(f"use it with: TDA_CHECKPOINT={args.folder.resolve()}")


if __name__ == "__main__":
    main()
