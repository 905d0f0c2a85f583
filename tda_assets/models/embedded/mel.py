"""The embedded model's fixed "autoencoder": a normalised log-mel front end and a Griffin-Lim inverse."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch


def _hz_to_mel(f: np.ndarray) -> np.ndarray:
    return 2595.0 * np.log10(1.0 + f / 700.0)


def _mel_to_hz(m: np.ndarray) -> np.ndarray:
    return 700.0 * (10.0 ** (m / 2595.0) - 1.0)


def mel_filterbank(sample_rate: int, n_fft: int, n_mels: int, f_min: float, f_max: float) -> np.ndarray:
    """Triangular HTK-mel filters [n_mels, n_fft // 2 + 1], each normalised to unit area."""
    freqs = np.linspace(0, sample_rate / 2, n_fft // 2 + 1)
    edges = _mel_to_hz(np.linspace(_hz_to_mel(np.array(f_min)), _hz_to_mel(np.array(f_max)), n_mels + 2))
    fb = np.zeros((n_mels, len(freqs)))
    for m in range(n_mels):
        lo, mid, hi = edges[m], edges[m + 1], edges[m + 2]
        up = (freqs - lo) / (mid - lo)
        down = (hi - freqs) / (hi - mid)
        fb[m] = np.clip(np.minimum(up, down), 0, None)
    fb /= fb.sum(axis=1, keepdims=True).clip(min=1e-8)
    return fb.astype(np.float32)


@dataclass(frozen=True)
class MelFrontend:
    """Audio [b, samples] at `sample_rate` ↔ latents [b, n_mels, frames]: log-mel, shifted and scaled to unit-ish
    variance."""

    sample_rate: int = 16000
    n_fft: int = 2048
    hop: int = 1024
    n_mels: int = 32
    frames: int = 64
    f_min: float = 30.0
    f_max: float = 8000.0
    log_floor: float = 1e-4
    shift: float = 0.9
    scale: float = 4.6
    # Each clip's window is scaled to this peak before the STFT, so a quieter or louder copy encodes the same latents
    # (the embedded corpus is rendered at peak 0.9, so its latents are unchanged). None keeps the level as given.
    peak: float | None = 0.9

    @property
    def window_samples(self) -> int:
        return self.frames * self.hop

    def config(self) -> dict:
        return asdict(self)

    def level(self, audio: np.ndarray) -> np.ndarray:
        """The clip scaled to `peak` (unchanged when `peak` is None or the clip is silent)."""
        top = float(np.abs(audio).max()) if len(audio) else 0.0
        if self.peak is None or top == 0.0:
            return audio
        return audio * (self.peak / top)

    def _fb(self) -> torch.Tensor:
        return torch.from_numpy(mel_filterbank(self.sample_rate, self.n_fft, self.n_mels, self.f_min, self.f_max))

    def encode(self, audio: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Latents [b, n_mels, frames] and a frame mask [b, frames]: clips are zero-padded or cut to the window."""
        audio = audio.float()
        n = audio.shape[-1]
        valid_frames = min(self.frames, max(1, int(np.ceil(n / self.hop))))
        if n < self.window_samples:
            audio = torch.nn.functional.pad(audio, (0, self.window_samples - n))
        audio = audio[..., : self.window_samples]
        spec = torch.stft(audio, self.n_fft, self.hop, window=torch.hann_window(self.n_fft), return_complex=True)
        power = spec.abs().pow(2)[..., : self.frames]
        mel = torch.einsum("mf,bft->bmt", self._fb(), power)
        latents = (torch.log(mel + self.log_floor) + self.shift) / self.scale
        mask = torch.zeros(audio.shape[0], self.frames)
        mask[:, :valid_frames] = 1.0
        return latents, mask

    def decode(self, latents: torch.Tensor, iterations: int = 48, seed: int = 0) -> torch.Tensor:
        """Audio [b, window_samples] from latents by mel pseudo-inverse and Griffin-Lim (good enough to listen to)."""
        mel = (torch.exp(latents.float() * self.scale - self.shift) - self.log_floor).clamp_min(0)
        fb = self._fb()
        mag = torch.einsum("fm,bmt->bft", torch.linalg.pinv(fb), mel).clamp_min(0).sqrt()
        mag = torch.nn.functional.pad(mag, (0, 1), mode="replicate")  # stft with center=True has frames + 1 columns
        window = torch.hann_window(self.n_fft)
        g = torch.Generator().manual_seed(seed)
        phase = torch.exp(2j * np.pi * torch.rand(mag.shape, generator=g))
        length = self.window_samples
        for _ in range(iterations):
            audio = torch.istft(mag * phase, self.n_fft, self.hop, window=window, length=length)
            spec = torch.stft(audio, self.n_fft, self.hop, window=window, return_complex=True)
            phase = torch.exp(1j * torch.angle(spec))
        audio = torch.istft(mag * phase, self.n_fft, self.hop, window=window, length=length)
        peak = audio.abs().amax(dim=-1, keepdim=True).clamp_min(1e-6)
        return 0.9 * audio / peak
