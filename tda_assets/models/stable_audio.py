"""Stable Audio Open as a tda model: Oobleck VAE + T5 + projection model + `StableAudioDiTModel`, as diffusers lays it
out.

The conditioning mirrors `diffusers.StableAudioPipeline` exactly:
`encoder_hidden_states` = concat(projected T5 states × attention mask, seconds_start state, seconds_end state) along the
sequence, `global_hidden_states` = concat(seconds_start, seconds_end) along features. The denoiser's timestep is
t ∈ [0, 1] of the v-objective (α = cos(πt/2), σ = sin(πt/2)), which is what the pipeline's
`CosineDPMSolverMultistepScheduler` feeds it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from diffusers import (
    AutoencoderOobleck,
    CosineDPMSolverMultistepScheduler,
    StableAudioDiTModel,
    StableAudioPipeline,
    StableAudioProjectionModel,
)
from transformers import AutoTokenizer, PreTrainedTokenizerBase, T5Config, T5EncoderModel

from tda_assets.attribution.adapter import DiTAdapter
from tda_assets.attribution.errors import AttributionInputError, ModelSourceError
from tda_assets.attribution.objective import DiffusionObjective
from tda_assets.models.embedded.text import check_captions

PIPELINE_CLASS = "StableAudioPipeline"
# Audio samples per VAE pass: one Stable Audio Open window (2^21 samples, 47.5 s at 44.1 kHz). The Oobleck encoder's
# first stage holds 128 channels × samples × 4 bytes per tensor (1 GB a window): 3 windows at once took over 12 GB.
VAE_PASS_SAMPLES = 2**21
COMPONENTS = ("vae", "text_encoder", "tokenizer", "projection_model", "transformer")
TINY_WORDS = (
    "a an the and with of in at slow fast calm loud soft bright dark warm piano guitar drums bass synth strings "
    "violin flute voice choir beat loop melody chord rhythm groove ambient techno jazz rock folk pop house "
    "major minor tempo bpm music song track sound"
).split()


def _tiny_tokenizer(max_length: int = 8) -> PreTrainedTokenizerBase:
    """A word-level tokenizer built offline, T5-like: `<pad>`=0, `</s>`=1 appended to every caption, `<unk>`=2."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    for w in TINY_WORDS:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", model_max_length=max_length
    )


def _check_pipeline_folder(folder: Path) -> None:
    """Raise `ModelSourceError` unless `folder` is a StableAudioPipeline folder with every component tda needs."""
    if not folder.is_dir():
        raise ModelSourceError(f"Stable Audio model folder {folder} does not exist")
    index = folder / "model_index.json"
    if index.is_file():
        try:
            cls = json.loads(index.read_text()).get("_class_name")
        except json.JSONDecodeError as exc:
            raise ModelSourceError(f"{index} is not valid JSON ({exc}); re-download or re-save the model") from exc
        if cls != PIPELINE_CLASS:
            raise ModelSourceError(
                f"model folder {folder} holds a diffusers {cls}, not a {PIPELINE_CLASS}; "
                "point the checkpoint at a Stable Audio Open snapshot (e.g. stabilityai/stable-audio-open-1.0)"
            )
    missing = [c for c in COMPONENTS if not (folder / c).is_dir()]
    if missing:
        raise ModelSourceError(
            f"Stable Audio model folder {folder} lacks component folder(s) {', '.join(m + '/' for m in missing)}: "
            f"a StableAudioPipeline.save_pretrained folder has {', '.join(c + '/' for c in COMPONENTS)}; "
            "download the complete snapshot"
        )


def _materialise(module: torch.nn.Module) -> torch.nn.Module:
    """Copy weights loaded from safetensors into fresh fp32 tensors, eval mode.

    Loaded tensors can sit at unaligned addresses (memory-mapped file offsets), which sends CPU matmuls down other
    kernel paths: losses then differ from the in-memory model's in the last bit. Fresh copies make them identical.
    """
    module.float().eval()
    with torch.no_grad():
        for p in module.parameters():
            p.data = p.data.clone()
        for name, buf in list(module.named_buffers()):
            owner = module.get_submodule(name.rpartition(".")[0]) if "." in name else module
            setattr(owner, name.rpartition(".")[2], buf.clone())
    return module


def _encoder_reach(encoder: torch.nn.Module, hop: int) -> tuple[int, int]:
    """Latent frames before and after a frame that the encoder's output at that frame depends on: the receptive field
    of its convolutions (run in the order they are registered, as the Oobleck encoder runs them), rounded up to frames.
    """
    lo, hi = 0, 0  # the input samples one output frame reads, relative to frame × hop
    for conv in reversed([m for m in encoder.modules() if isinstance(m, torch.nn.Conv1d)]):
        (k,), (s,), (d,), (p,) = conv.kernel_size, conv.stride, conv.dilation, conv.padding
        lo, hi = lo * s - p, hi * s - p + d * (k - 1)
    return -(lo // hop), -(-(hi + 1 - hop) // hop)


def _weight_files(component: Path) -> list[Path] | None:
    """The safetensors file(s) of a diffusers component folder (one file, or the shards its index names), or None for
    another layout (`.bin`, variants), which diffusers' own loader reads."""
    from diffusers.utils.constants import SAFE_WEIGHTS_INDEX_NAME, SAFETENSORS_WEIGHTS_NAME

    single = component / SAFETENSORS_WEIGHTS_NAME
    if single.is_file():
        return [single]
    index = component / SAFE_WEIGHTS_INDEX_NAME
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [component / s for s in shards]
    return None


def _load_component(cls: type, component: Path) -> torch.nn.Module:
    """A diffusers model (fp32, eval) whose weights are each read once, straight into their own fresh memory.

    diffusers' `from_pretrained` (without accelerate) keeps the memory-mapped file resident while `_materialise` copies
    it: the weights twice, 8.4 GB at the peak for Stable Audio Open's DiT. Here the model is built without initialising
    its weights, each tensor of the file is read into a fresh (aligned) tensor and assigned: the weights once.
    """
    from diffusers.models.modeling_utils import no_init_weights

    from tda_assets.io.storage import Storage, StorageError

    files = _weight_files(component)
    if files is None:
        return _materialise(cls.from_pretrained(component, torch_dtype=torch.float32))
    with no_init_weights():
        model = cls.from_config(cls.load_config(component))
    state: dict[str, torch.Tensor] = {}
    try:
        for file in files:
            state.update(Storage(str(file.parent)).read_tensors(file.name)[0])
        model.load_state_dict(state, strict=True, assign=True)
    except (StorageError, RuntimeError) as exc:
        raise ModelSourceError(f"model component {component} cannot be loaded: {exc}") from exc
    del state
    return model.float().eval()


def _load_scheduler(folder: Path) -> CosineDPMSolverMultistepScheduler:
    """The folder's scheduler (its own class, from `scheduler/`), or Stable Audio Open's default when absent."""
    import diffusers

    config = folder / "scheduler" / "scheduler_config.json"
    if not config.is_file():
        return CosineDPMSolverMultistepScheduler()
    name = json.loads(config.read_text()).get("_class_name", "CosineDPMSolverMultistepScheduler")
    cls = getattr(diffusers, name, CosineDPMSolverMultistepScheduler)
    return cls.from_pretrained(folder / "scheduler")


@dataclass(kw_only=True)
class StableAudioAdapter(DiTAdapter):
    """Stable Audio Open (or a tiny stand-in): frozen Oobleck VAE, T5 text encoder and projection model; DiT
    denoiser."""

    vae: AutoencoderOobleck
    text_encoder: T5EncoderModel
    tokenizer: PreTrainedTokenizerBase
    projection_model: StableAudioProjectionModel
    scheduler: Any = field(default_factory=CosineDPMSolverMultistepScheduler)
    objective: DiffusionObjective = field(default_factory=lambda: DiffusionObjective("v"))
    kind: str = "stable_audio"
    encode_batch_size: int = 16
    encode_chunk_frames: int = 128  # latent frames per VAE encoder pass over a long window (0: the whole window)

    def __post_init__(self) -> None:
        self.sample_rate = int(self.vae.config.sampling_rate)
        for module in (self.vae, self.text_encoder, self.projection_model):
            module.eval().requires_grad_(False)  # frozen encoders; only the denoiser is attributed
        self.denoiser.eval()

    # ----- geometry -----------------------------------------------------------------------------------------------
    @property
    def hop_length(self) -> int:
        """Audio samples per latent frame (the VAE's total downsampling ratio)."""
        return int(self.vae.hop_length)

    @property
    def window_samples(self) -> int:
        """Audio samples the latent window covers (`sample_size × hop_length`, as the pipeline computes it)."""
        return int(self.denoiser.config.sample_size) * self.hop_length

    @property
    def vae_batch(self) -> int:
        """Clips per VAE pass: `encode_batch_size`, fewer when the window is long (VAE_PASS_SAMPLES, at least one)."""
        return max(1, min(self.encode_batch_size, VAE_PASS_SAMPLES // self.window_samples))

    @property
    def clip_seconds(self) -> float:
        """Duration the latent window covers: `sample_size × hop_length / sample_rate` (the pipeline's maximum)."""
        return self.window_samples / self.sample_rate

    @property
    def audio_channels(self) -> int:
        """Audio channels the VAE encodes and decodes (2 for Stable Audio Open)."""
        return int(self.vae.config.audio_channels)

    def to(self, device: torch.device | str) -> "StableAudioAdapter":
        """Move every component to `device`."""
        for module in (self.vae, self.text_encoder, self.projection_model):
            module.to(device)
        if self.has_denoiser:
            super().to(device)
        return self

    # ----- construction -------------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, folder: str | Path, denoiser: bool = True) -> "StableAudioAdapter":
        """Load a diffusers `StableAudioPipeline.save_pretrained` folder (fp32, eval); raises `ModelSourceError` if
        incomplete. `denoiser=False` loads the encoders only (the DiT's shape from its config, no weights): what
        encoding audio and text needs, without the DiT's 4.2 GB at Stable Audio Open's size."""
        folder = Path(folder)
        _check_pipeline_folder(folder)
        try:
            vae = _load_component(AutoencoderOobleck, folder / "vae")
            text_encoder = _materialise(T5EncoderModel.from_pretrained(folder / "text_encoder", dtype=torch.float32))
            tokenizer = AutoTokenizer.from_pretrained(folder / "tokenizer")
            projection = _load_component(StableAudioProjectionModel, folder / "projection_model")
            if denoiser:
                dit = _load_component(StableAudioDiTModel, folder / "transformer")
            else:
                with torch.device("meta"):  # shapes only: latent_shape and the window come from its config
                    dit = StableAudioDiTModel.from_config(StableAudioDiTModel.load_config(folder / "transformer"))
        except (OSError, ValueError, KeyError) as exc:
            raise ModelSourceError(f"Stable Audio model folder {folder} cannot be loaded: {exc}") from exc
        return cls(
            denoiser=dit,
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            projection_model=projection,
            scheduler=_load_scheduler(folder),
        )

    @property
    def has_denoiser(self) -> bool:
        """Whether the DiT's weights are loaded (not for `from_pretrained(denoiser=False)`: encoders only)."""
        return not next(self.denoiser.parameters()).is_meta

    @property
    def device(self) -> torch.device:
        """The denoiser's device, or the VAE's for an encoders-only adapter."""
        return super().device if self.has_denoiser else self._component_device(self.vae)

    def predict(self, x_t: torch.Tensor, t: torch.Tensor, conditioning: dict[str, torch.Tensor]) -> torch.Tensor:
        """The denoiser's output (`DiTAdapter.predict`); an encoders-only adapter refuses, naming the fix."""
        if not self.has_denoiser:
            raise ModelSourceError(
                "this Stable Audio adapter holds the encoders only (loaded with denoiser=False); "
                "load the model folder with its denoiser to run the DiT"
            )
        return super().predict(x_t, t, conditioning)

    @classmethod
    def tiny(cls, seed: int = 0) -> "StableAudioAdapter":
        """A tiny randomly initialised Stable Audio model built from configs (no download); a forward takes
        milliseconds."""
        torch.manual_seed(seed)
        vae = AutoencoderOobleck(
            encoder_hidden_size=8,
            downsampling_ratios=[2, 4],
            channel_multiples=[1, 2],
            decoder_channels=8,
            decoder_input_channels=4,
            audio_channels=2,
            sampling_rate=64,
        )
        tokenizer = _tiny_tokenizer(max_length=8)
        t5 = T5Config(
            vocab_size=len(tokenizer),
            d_model=16,
            d_kv=8,
            d_ff=32,
            num_layers=1,
            num_heads=2,
            relative_attention_num_buckets=8,
            relative_attention_max_distance=16,
            dropout_rate=0.0,
            pad_token_id=0,
            eos_token_id=1,
            decoder_start_token_id=0,
        )
        text_encoder = T5EncoderModel(t5)
        projection = StableAudioProjectionModel(
            text_encoder_dim=t5.d_model, conditioning_dim=12, min_value=0, max_value=8
        )
        latent_channels, conditioning = vae.config.decoder_input_channels, projection.config.conditioning_dim
        denoiser = StableAudioDiTModel(
            sample_size=16,
            in_channels=latent_channels,
            out_channels=latent_channels,
            num_layers=2,
            attention_head_dim=8,
            num_attention_heads=2,
            num_key_value_attention_heads=1,
            cross_attention_dim=16,
            time_proj_dim=8,
            global_states_input_dim=2 * conditioning,  # the seconds_start and seconds_end projections, side by side
            cross_attention_input_dim=conditioning,
        )
        return cls(
            denoiser=denoiser, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, projection_model=projection
        )

    def pipeline(self) -> StableAudioPipeline:
        """The diffusers pipeline made of this adapter's components (for saving or for reference sampling)."""
        return StableAudioPipeline(
            vae=self.vae,
            text_encoder=self.text_encoder,
            projection_model=self.projection_model,
            tokenizer=self.tokenizer,
            transformer=self.denoiser,
            scheduler=self.scheduler,
        )

    def save_pretrained(self, folder: str | Path) -> Path:
        """Write a real `StableAudioPipeline` folder (model_index.json + components) that `load_model` reads back."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.pipeline().save_pretrained(folder)
        return folder

    def folder_config(self) -> dict:
        """What identifies this model: kind, objective and geometry (the weights live in the pipeline folder)."""
        return {
            "kind": self.kind,
            "objective": asdict(self.objective),
            "sample_rate": self.sample_rate,
            "clip_seconds": self.clip_seconds,
            "latent_shape": list(self.latent_shape),
            "audio_channels": self.audio_channels,
            "max_tokens": int(self.tokenizer.model_max_length),
        }

    # ----- encoders -----------------------------------------------------------------------------------------------
    def _component_device(self, module: torch.nn.Module) -> torch.device:
        """The device a component's weights are on."""
        return next(module.parameters()).device

    def _audio_tensor(self, clip: np.ndarray, name: str) -> tuple[torch.Tensor, int]:
        """One clip as [audio_channels, window] (zero-padded or cut) and its real length in samples."""
        a = torch.as_tensor(np.asarray(clip), dtype=torch.float32)
        if a.dim() == 1:
            a = a.unsqueeze(0)
        if a.dim() != 2 or a.shape[-1] == 0:
            raise AttributionInputError(f"item {name}: audio must be mono samples [n] or [channels, n] with n > 0")
        if not torch.isfinite(a).all():
            raise AttributionInputError(f"item {name}: audio contains NaN or inf samples; replace the file")
        if a.shape[0] != self.audio_channels:
            a = a.mean(0, keepdim=True).expand(self.audio_channels, -1)  # mono duplicated to every channel
        n = self.window_samples
        out = torch.zeros(self.audio_channels, n)
        length = min(a.shape[-1], n)
        out[:, :length] = a[:, :length]
        return out, length

    def encode_audio(
        self, audio: list[np.ndarray], item_ids: list[str] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Latents [b, C, T] (the VAE posterior mean, deterministic) and frame masks [b, T] for clips at `sample_rate`.

        Stable Audio trained on *sampled* VAE latents; the mean is used so that a loss is a pure function of the item.
        """
        names = item_ids or [f"#{i}" for i in range(len(audio))]
        frames, hop = int(self.denoiser.config.sample_size), self.hop_length
        device = self._component_device(self.vae)
        latents, masks = [], []
        for lo in range(0, len(audio), self.vae_batch):
            clips = [self._audio_tensor(a, names[lo + i]) for i, a in enumerate(audio[lo : lo + self.vae_batch])]
            wave = torch.stack([c for c, _ in clips]).to(device)
            z = self._encode_mean(wave)
            if z.shape[-1] != frames:
                raise ModelSourceError(
                    f"the VAE maps {self.window_samples} samples to {z.shape[-1]} latent frames, but the DiT window is "
                    f"{frames}; the vae/ and transformer/ configs do not belong together"
                )
            latents.append(z)
            masks += [(torch.arange(frames) * hop < length).float() for _, length in clips]
        if not latents:
            return torch.zeros(0, *self.latent_shape), torch.zeros(0, frames)
        return torch.cat(latents), torch.stack(masks)

    def _encode_mean(self, wave: torch.Tensor) -> torch.Tensor:
        """The VAE posterior mean [b, C, frames] of windows [b, channels, samples] (on CPU), in passes of
        `encode_chunk_frames` frames, each encoded with the encoder's reach of audio as context on both sides.

        Every output frame sees exactly the samples it sees in a whole-window pass (the chunks start on the hop, the
        context covers the receptive field of the encoder's convolutions), so the latents are the whole window's,
        while the encoder's activations (128 channels × samples, 1 GB a tensor over a 47.5 s window) are a chunk's.
        """
        hop, total = self.hop_length, wave.shape[-1] // self.hop_length
        before, after = _encoder_reach(self.vae.encoder, hop)
        chunk = self.encode_chunk_frames
        if not chunk or total <= chunk + before + after:  # one pass: the whole window
            with torch.no_grad():
                return self.vae.encode(wave).latent_dist.mean.float().cpu()
        out = []
        for f0 in range(0, total, chunk):
            f1 = min(total, f0 + chunk)
            a, b = max(0, f0 - before), min(total, f1 + after)  # the frames whose audio this pass reads
            with torch.no_grad():
                z = self.vae.encode(wave[..., a * hop : b * hop]).latent_dist.mean.float().cpu()
            if z.shape[-1] != b - a:
                raise ModelSourceError(
                    f"the VAE maps {(b - a) * hop} samples to {z.shape[-1]} latent frames, not {b - a}: its hop is "
                    f"not {hop}; check the vae/ config"
                )
            out.append(z[..., f0 - a : f1 - a])
        return torch.cat(out, dim=-1)

    def _seconds(self, value: float | Sequence[float] | None, n: int, default: float, what: str) -> torch.Tensor:
        """One non-negative duration per caption, from a scalar or a per-item list."""
        if value is None:
            value = default
        values = [float(value)] * n if isinstance(value, (int, float)) else [float(v) for v in value]
        if len(values) != n:
            raise AttributionInputError(f"{what}: got {len(values)} values for {n} captions")
        out = torch.tensor(values, dtype=torch.float32)
        if not torch.isfinite(out).all() or (out < 0).any():
            raise AttributionInputError(f"{what} must be finite and non-negative, got {values[:5]}")
        return out

    def encode_text(
        self,
        captions: list[str],
        item_ids: list[str] | None = None,
        seconds_start: float | Sequence[float] = 0.0,
        seconds_end: float | Sequence[float] | None = None,
        durations: Sequence[float] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Conditioning exactly as `StableAudioPipeline` builds it.

        `seconds_end` defaults to each item's audio duration (`durations`, capped at the window) as the model was
        trained, else to the window (`clip_seconds`), as the pipeline generates.

        Returns `encoder_hidden_states` [b, max_tokens + 2, D] and `global_hidden_states` [b, 1, 2D] on CPU.
        """
        check_captions(captions, item_ids)
        n = len(captions)
        start = self._seconds(seconds_start, n, 0.0, "seconds_start")
        if seconds_end is None and durations is not None:
            seconds_end = [min(float(d), self.clip_seconds) for d in durations]
        end = self._seconds(seconds_end, n, self.clip_seconds, "seconds_end")
        bad = (end < start).nonzero().flatten().tolist()
        if bad:
            name = item_ids[bad[0]] if item_ids else f"#{bad[0]}"
            raise AttributionInputError(
                f"item {name}: seconds_end {float(end[bad[0]])} is before seconds_start {float(start[bad[0]])}"
            )
        device = self._component_device(self.text_encoder)
        states, pooled = [], []
        for lo in range(0, n, self.encode_batch_size):
            hi = min(n, lo + self.encode_batch_size)
            enc = self.tokenizer(
                captions[lo:hi],
                padding="max_length",
                max_length=self.tokenizer.model_max_length,
                truncation=True,
                return_tensors="pt",
            )
            ids, mask = enc.input_ids.to(device), enc.attention_mask.to(device)
            with torch.no_grad():
                text = self.text_encoder(ids, attention_mask=mask)[0]
                text = self.projection_model(text_hidden_states=text).text_hidden_states
                text = text * mask.unsqueeze(-1).to(text.dtype)
                proj_device = self._component_device(self.projection_model)
                sec = self.projection_model(
                    start_seconds=start[lo:hi].to(proj_device), end_seconds=end[lo:hi].to(proj_device)
                )
                s0, s1 = sec.seconds_start_hidden_states, sec.seconds_end_hidden_states
            states.append(torch.cat([text, s0, s1], dim=1).float().cpu())
            pooled.append(torch.cat([s0, s1], dim=2).float().cpu())
        return {"encoder_hidden_states": torch.cat(states), "global_hidden_states": torch.cat(pooled)}

    @staticmethod
    def null_conditioning(conditioning: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The pipeline's unconditional input: zero cross-attention states, the same (duration) global states."""
        out = {k: torch.zeros_like(v) for k, v in conditioning.items()}
        if "global_hidden_states" in conditioning:
            out["global_hidden_states"] = conditioning["global_hidden_states"]
        return out

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Mono audio [b, samples] from latents [b, C, T] via `vae.decode` (channels averaged), on CPU."""
        device = self._component_device(self.vae)
        out = []
        for lo in range(0, latents.shape[0], self.vae_batch):
            with torch.no_grad():
                wave = self.vae.decode(latents[lo : lo + self.vae_batch].to(device, torch.float32)).sample
            out.append(wave.float().mean(dim=1).cpu())
        return torch.cat(out) if out else torch.zeros(0, self.window_samples)
