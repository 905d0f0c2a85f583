"""The method's view of a text-to-music latent diffusion model: encoders, denoiser, objective."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterator

import torch
from diffusers import StableAudioDiTModel
from diffusers.models.embeddings import get_1d_rotary_pos_embed
from torch.nn.utils import parametrize

from .objective import DiffusionObjective
from .settings import PARAM_SUBSETS
from .split import delta_term, split_active, splits


@dataclass
class ItemBatch:
    """Encoded items: latents `z` [b, C, T], conditioning tensors [b, ...], and a frame mask [b, T] (1 = real audio)."""

    item_ids: list[str]
    latents: torch.Tensor
    conditioning: dict[str, torch.Tensor]
    frame_mask: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.item_ids)

    def select(self, index: slice | list[int]) -> "ItemBatch":
        """A sub-batch (rows by slice or index list)."""
        ids = self.item_ids[index] if isinstance(index, slice) else [self.item_ids[i] for i in index]
        pick = (lambda x: x[index]) if isinstance(index, slice) else (lambda x: x[torch.tensor(index)])
        mask = None if self.frame_mask is None else pick(self.frame_mask)
        return ItemBatch(ids, pick(self.latents), {k: pick(v) for k, v in self.conditioning.items()}, mask)


@dataclass
class DiTAdapter:
    """Shared machinery of adapters whose denoiser is a diffusers `StableAudioDiTModel` on 1-D latent sequences.

    Subclasses provide the encoders (`encode_audio`, `encode_text`) and the decoder.
    """

    denoiser: StableAudioDiTModel
    objective: DiffusionObjective = field(default_factory=DiffusionObjective)
    kind: str = "dit"
    sample_rate: int = 16000
    _rotary_cache: dict = field(default_factory=dict, repr=False)

    @property
    def latent_shape(self) -> tuple[int, int]:
        cfg = self.denoiser.config
        return (cfg.in_channels, cfg.sample_size)

    def to(self, device: torch.device | str) -> "DiTAdapter":
        self.denoiser.to(device)
        self._rotary_cache.clear()
        return self

    @property
    def device(self) -> torch.device:
        return next(self.denoiser.parameters()).device

    def _rotary(self, seq_len: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        key = (seq_len, str(device))
        if key not in self._rotary_cache:
            dim = self.denoiser.config.attention_head_dim // 2
            cos, sin = get_1d_rotary_pos_embed(dim, seq_len + 1, use_real=True, repeat_interleave_real=False)
            self._rotary_cache[key] = (cos.to(device), sin.to(device))
        return self._rotary_cache[key]

    def predict(self, x_t: torch.Tensor, t: torch.Tensor, conditioning: dict[str, torch.Tensor]) -> torch.Tensor:
        """The denoiser's output for noisy latents `x_t` [n, C, T] at timesteps `t` [n]."""
        return self.denoiser(
            x_t,
            t.to(x_t.dtype),
            encoder_hidden_states=conditioning["encoder_hidden_states"],
            global_hidden_states=conditioning["global_hidden_states"],
            rotary_embedding=self._rotary(x_t.shape[-1], x_t.device),
            return_dict=False,
        )[0]

    def parameter_subset(self, subset: str) -> dict[str, torch.nn.Parameter]:
        """The denoiser parameters that unlearning may change, by the names of DESIGN §1."""
        if subset not in PARAM_SUBSETS:
            raise ValueError(f"unknown param_subset {subset!r}: choose one of {', '.join(PARAM_SUBSETS)}")
        named = dict(self.denoiser.named_parameters())

        def keep(name: str) -> bool:
            if not name.startswith("transformer_blocks."):
                return False
            if subset == "all":
                return True
            if subset == "attention":
                return ".attn1." in name or ".attn2." in name
            if subset == "self_attention":
                return ".attn1." in name
            if subset == "cross_attention":
                return ".attn2." in name
            return ".attn2.to_k." in name or ".attn2.to_v." in name

        return {n: p for n, p in named.items() if keep(n)}

    def folder_config(self) -> dict:
        """What `tda_model.json` records so that `load_model` can rebuild this adapter."""
        raise NotImplementedError

    @staticmethod
    def null_conditioning(conditioning: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The unconditional input used for classifier-free guidance: all-zero conditioning."""
        return {k: torch.zeros_like(v) for k, v in conditioning.items()}


class _Shifted(torch.nn.Module):
    """A parametrization: the weight read as `θ0 + scale · direction`, computed each time it is read (θ0 untouched)."""

    def __init__(self, direction: torch.Tensor, scale: float = 1.0, split: bool = False) -> None:
        super().__init__()
        self.direction, self.scale, self.split = direction, scale, split

    def step(self) -> torch.Tensor:
        """The change now: `scale · direction`."""
        return self.direction if self.scale == 1.0 else self.scale * self.direction

    def forward(self, theta0: torch.Tensor) -> torch.Tensor:
        if self.split and split_active():
            return theta0  # bf16-split: the matmul adds `f(x; step)` as its own term (split.py)
        return (theta0 + self.step()).to(theta0.dtype)  # what `θ0.add_(step)` stores, bit for bit


@contextlib.contextmanager
def shifted_parameters(
    module: torch.nn.Module, directions: dict[str, torch.Tensor], scale: float = 1.0
) -> Iterator[dict[str, _Shifted]]:
    """Context in which the named parameters read as `θ0 + scale · directions[n]` (set `.scale` of the yielded
    parametrizations to move along the directions); θ0 is never written, so it is exactly itself on exit.

    The shifted weights are computed when a forward reads them and dropped after (one weight at a time under no_grad):
    no saved copy of θ0 and no shifted copy of the model (4.2 GB each at Stable Audio Open's size). Inside, the
    parameters are registered under `<module>.parametrizations.<name>.original` (torch's parametrize). Under the
    `bf16-split` loss precision (split.py) a Linear's or Conv1d's weight and bias read as θ0 and the matmul adds the
    change as its own term."""
    params = dict(module.named_parameters())
    missing = sorted(set(directions) - set(params))
    if missing:
        raise KeyError(f"delta names parameters the model does not have: {missing[:3]}…")
    shifts: dict[str, _Shifted] = {}
    try:
        with contextlib.ExitStack() as terms:
            for n, d in directions.items():
                owner, _, attr = n.rpartition(".")
                holder = module.get_submodule(owner)
                shift = _Shifted(d.to(params[n].device), scale, splits(holder, attr))
                parametrize.register_parametrization(holder, attr, shift, unsafe=True)
                shifts[n] = shift
                if shift.split:  # under `bf16_split` its matmul evaluates the change as a separate term
                    terms.enter_context(delta_term(getattr(holder.parametrizations, attr).original, shift))
            yield shifts
    finally:
        for n in shifts:
            owner, _, attr = n.rpartition(".")
            parametrize.remove_parametrizations(module.get_submodule(owner), attr, leave_parametrized=False)


@contextlib.contextmanager
def apply_delta(module: torch.nn.Module, delta: dict[str, torch.Tensor]) -> Iterator[None]:
    """Context in which the module computes with weights `θ0 + delta` (the unlearned model); θ0 is unchanged on exit.

    The weights are `shifted_parameters`: computed when read, so the unlearned model costs the delta and no saved copy
    of θ0 (the delta added in place needed one: 4.2 GB at a full 1 B delta)."""
    with shifted_parameters(module, delta):
        yield
