"""A copy detector's view of a clip (issue 24): its latent map [C, T] made robust to the edits a copy goes through,
compared by the best time alignment, so a shifted, cropped, slightly sped-up, noisy or compressed copy still matches
its source frame by frame while another clip of the same style does not.

The map: on a log-mel latent (the embedded model), everything more than `FLOOR_DB` below the clip's loudest bin is
raised to that floor (white noise at 30 dB SNR lies under it); each frame's mean over channels is removed (a gain that
changes over the clip, a fade, is a per-frame constant in the log domain); each channel is centered over the clip's real
frames; a [1, 2, 1] blur over time absorbs sub-frame misalignment; padded frames are zero; time is average-pooled to at
most `MAX_FRAMES`. The score of a query against an item is the largest masked normalized correlation of their maps
over time shifts up to `MAX_SHIFT_FRAMES` and time stretches `STRETCHES` of the query."""

from __future__ import annotations

import math

import torch

# Log-mel floor below the clip's loudest bin (dB). Measured on the embedded demo corpus (320 items, 40 random sources ×
# the near-copy transforms, 40 held-out same-artist renders; an earlier form of the map, without the frame-mean
# removal): without a floor, noise at 30 dB SNR put copies as low as 0.69 (median 0.93); floors of 30/40/50 dB lifted
# them to ≥ 1.00/0.998/0.979 and left held-out clips where they were (median 0.58–0.64); the fade copies' lowest was
# 0.76/0.82/0.86: 40 dB trades the two.
FLOOR_DB = 40.0
MAX_FRAMES = 64  # time is pooled to at most this many frames (Stable Audio Open's 1024 frames → 64 of ≈ 0.74 s)
MAX_SHIFT_FRAMES = 10  # ± frames searched (0.64 s on the embedded model: a 10% crop of its 4.1 s window is 6.4)
# Time stretches of the query searched: a grid 1% apart over ±4%, so a few percent's tempo change lands within 0.5% of
# one (on the demo corpus, 40 copies sped up 3%: a 2% grid left them at ≥ 0.861, this one at ≥ 0.883; held-out clips
# moved by under 0.01)
STRETCHES = (0.96, 0.97, 0.98, 0.99, 1.0, 1.01, 1.02, 1.03, 1.04)
_BLUR = (0.25, 0.5, 0.25)


def log_mel_floor(scale: float | None) -> float | None:
    """`FLOOR_DB` in the units of a log-mel latent `ln(mel) / scale` (None: the latent is no log-mel, no floor)."""
    return None if scale is None else FLOOR_DB / 10 * math.log(10) / scale


def latent_map(latents: torch.Tensor, frame_mask: torch.Tensor | None, floor: float | None) -> torch.Tensor:
    """Each clip's map, flattened with its frame mask and frame count: [b, C·T' + T' + 1] float32 (T' ≤ MAX_FRAMES);
    `floor` in latent units below the clip's maximum (None: no floor)."""
    z = latents.float().cpu()
    b, c, t = z.shape
    m = torch.ones(b, t) if frame_mask is None else (frame_mask.float().cpu() > 0).float()
    real = m.unsqueeze(1) > 0
    if floor is not None:
        top = z.masked_fill(~real, -torch.inf).amax(dim=(1, 2), keepdim=True)
        z = torch.maximum(z, top - floor)
    z = z - z.mean(dim=1, keepdim=True)
    mean = (z * m.unsqueeze(1)).sum(-1, keepdim=True) / m.sum(-1).clamp_min(1).view(b, 1, 1)
    z = (z - mean) * m.unsqueeze(1)
    kernel = torch.tensor(_BLUR).view(1, 1, 3).expand(c, 1, 3)
    z = torch.nn.functional.conv1d(z, kernel, padding=1, groups=c) * m.unsqueeze(1)
    pool = math.ceil(t / MAX_FRAMES)
    if pool > 1:
        pad = pool * math.ceil(t / pool) - t
        z = torch.nn.functional.avg_pool1d(torch.nn.functional.pad(z, (0, pad)), pool)
        m = torch.nn.functional.avg_pool1d(torch.nn.functional.pad(m, (0, pad)).unsqueeze(1), pool).squeeze(1) > 0
        m = m.float()
    frames = z.shape[-1]
    return torch.cat([z.reshape(b, -1), m, torch.full((b, 1), float(frames))], dim=1)


def _unpack(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Maps [n, C, T'] and masks [n, T'] from `latent_map` rows [n, D]."""
    frames = int(x[0, -1])
    channels = (x.shape[1] - 1 - frames) // frames
    if frames < 1 or channels * frames + frames + 1 != x.shape[1]:
        raise ValueError(f"latent_match: rows of width {x.shape[1]} are no latent_map output (frames {frames})")
    return x[:, : channels * frames].reshape(-1, channels, frames), x[:, channels * frames : -1]


def _stretch(q: torch.Tensor, mask: torch.Tensor, factor: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The map [C, T] played `factor` times faster (output frame t reads input t·factor, linearly interpolated)."""
    t = q.shape[-1]
    pos = torch.arange(t, dtype=torch.float32) * factor
    lo = pos.floor().long().clamp(0, t - 1)
    hi = (lo + 1).clamp(max=t - 1)
    w = pos - pos.floor()
    out = q[:, lo] * (1 - w) + q[:, hi] * w
    keep = (pos <= mask.sum() - 1).float() * mask[lo]
    return out * keep, keep


def _best_alignment(q: torch.Tensor, qm: torch.Tensor, items: torch.Tensor, energy: torch.Tensor) -> torch.Tensor:
    """Largest masked normalized correlation [N] of query maps [K, C, T] (masks [K, T]: windows × stretches) with item
    maps [N, C, T] (frame energies [N, T]) over shifts up to ±MAX_SHIFT_FRAMES, each side's norm taken over the frames
    both cover at that shift."""
    t = q.shape[-1]
    s = min(MAX_SHIFT_FRAMES, t - 1)
    padded = torch.nn.functional.pad(items, (s, s))  # item frames outside the clip: zero
    num = torch.nn.functional.conv1d(padded, q)  # [N, K, 2s+1]
    item_energy = torch.nn.functional.conv1d(torch.nn.functional.pad(energy, (s, s)).unsqueeze(1), qm.unsqueeze(1))
    inside = torch.nn.functional.pad(torch.ones(1, 1, t), (s, s))  # where an item frame exists at each shift
    query_energy = torch.nn.functional.conv1d(inside, q.pow(2).sum(1, keepdim=True))  # [1, K, 2s+1]
    den = (item_energy * query_energy).clamp_min(0).sqrt()
    score = torch.where(den > 0, num / den.clamp_min(1e-12), torch.zeros_like(num))
    return score.flatten(1).amax(dim=1)


def shift_scores(query: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
    """Scores [N] of a query's `latent_map` rows [w, D] (its windows) against items' [N, D]: the best alignment over
    `STRETCHES`, shifts and the query's windows (a long clip copies an item where any window does)."""
    q_maps, q_masks = _unpack(query.reshape(-1, query.shape[-1]).float())
    maps, masks = _unpack(items.float())
    if q_maps.shape[1:] != maps.shape[1:]:
        raise ValueError(f"latent_match: query maps {tuple(q_maps.shape[1:])} and item maps {tuple(maps.shape[1:])}")
    stretched = [_stretch(q, qm, f) for q, qm in zip(q_maps, q_masks) for f in STRETCHES]
    q_all, m_all = torch.stack([a for a, _ in stretched]), torch.stack([m for _, m in stretched])
    return _best_alignment(q_all, m_all, maps, maps.pow(2).sum(1) * masks)
