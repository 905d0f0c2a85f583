"""A seeded CountSketch of (per-item) gradients: `D` coordinates → `k` buckets, never a dense `k × D` matrix.

Coordinate `j` of parameter tensor `name` goes to bucket `h(j)` with sign `s(j)`; `h` and `s` are drawn from a
generator seeded by `(seed, name, k)`, so the sketch of one tensor never depends on which other tensors are sketched
with it (a parameter subset's sketch is the restriction of the full model's sketch). Storage is one int32 bucket index
and one int8 sign per coordinate, or one int16 code for both when k < 2^15: O(D). `E‖Sx‖² = ‖x‖²`,
`E⟨Sx, Sy⟩ = ⟨x, y⟩`; the relative error of `‖Sx‖²` has std ≈ sqrt(2/k) for a vector whose mass is spread over many
coordinates.
"""

from __future__ import annotations

from typing import Mapping

import torch

from .protocol import draw_seed

FLAT = ""  # the one "tensor name" of a flat [b, D] input
COMPACT_K = 2**15  # below it a coordinate's bucket and sign share one int16
# Above this many coordinates the hash is not held on the CPU but drawn again per tensor at each projection: at Stable
# Audio Open's D = 1.057 B it would be 2.1 GB beside the weights, the Fisher and an item's gradient (4.2 GB each)
HELD_MAX_D = 10**8


class CountSketch:
    """The CountSketch of tensors with the given per-row sizes (`{name: numel}`), into `k` dimensions."""

    def __init__(self, sizes: Mapping[str, int], k: int, seed: int = 0) -> None:
        if k < 1:
            raise ValueError(f"sketch dimension k must be at least 1, got {k}")
        self.k, self.seed, self.sizes = k, seed, dict(sizes)
        self._hash: dict[str, torch.Tensor | tuple[torch.Tensor, torch.Tensor]] = {}
        self.held = self.dim <= HELD_MAX_D  # else drawn again per tensor on each CPU projection (or kept on a GPU)
        for name in self.sizes if self.held else ():
            self._hash[name] = self._draw(name)

    def _draw(self, name: str) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Tensor `name`'s hash from its own generator (the same whenever it is drawn)."""
        g = torch.Generator().manual_seed(draw_seed(self.seed, f"countsketch:{name}", self.k))
        numel = self.sizes[name]
        bucket = torch.randint(0, self.k, (numel,), generator=g, dtype=torch.int64).to(torch.int32)
        sign = (torch.randint(0, 2, (numel,), generator=g, dtype=torch.int8) * 2 - 1).to(torch.int8)
        # k < 2^15: one int16 code ±(bucket + 1) per coordinate (2 bytes, not 5: 2.1 GB at a 1 B-parameter subset)
        return ((bucket + 1) * sign).to(torch.int16) if self.k < COMPACT_K else (bucket, sign)

    @property
    def dim(self) -> int:
        """`D`, the number of coordinates sketched."""
        return sum(self.sizes.values())

    def project(self, grads: Mapping[str, torch.Tensor] | torch.Tensor) -> torch.Tensor:
        """Sketch `{name: [b, *shape]}` (or a flat [b, D]) into [b, k] fp32 on the input's device."""
        if isinstance(grads, torch.Tensor):
            grads = {FLAT: grads}
        if set(grads) != set(self.sizes):
            extra, missing = sorted(set(grads) - set(self.sizes)), sorted(set(self.sizes) - set(grads))
            raise KeyError(f"sketch built for other tensors: extra {extra[:3]}, missing {missing[:3]}")
        first = next(iter(grads.values()))
        out = torch.zeros(first.shape[0], self.k, dtype=torch.float32, device=first.device)
        for name, g in grads.items():
            self.add(name, g, out)
        return out

    def add(self, name: str, g: torch.Tensor, out: torch.Tensor) -> None:
        """Add tensor `name`'s sketch of `g` [b, *shape] into `out` [b, k] (a projection one tensor at a time)."""
        rows = g.reshape(g.shape[0], -1)
        if rows.shape[1] != self.sizes[name]:
            raise ValueError(f"{name!r}: {rows.shape[1]} coordinates per row, sketch built for {self.sizes[name]}")
        bucket, sign = self._hash_on(name, out.device)
        out.index_add_(1, bucket, rows.float() * sign)

    def _hash_on(self, name: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Tensor `name`'s bucket indices and signs on `device`, moved there once (2.1 GB at Stable Audio Open's size,
        too much to copy to a GPU per item)."""
        stored = self._hash.get(name)
        if stored is None:  # not held (D > HELD_MAX_D): drawn now; kept only on an accelerator, where memory is spare
            stored = self._draw(name)
            if device.type != "cpu":
                self._hash[name] = stored = self._to(stored, device)
        first = stored if isinstance(stored, torch.Tensor) else stored[0]
        if first.device != device:
            self._hash[name] = stored = self._to(stored, device)
        if isinstance(stored, torch.Tensor):  # the compact code, decoded for this tensor only
            return (stored.abs().to(torch.int32) - 1), stored.sign().to(torch.int8)
        return stored

    @staticmethod
    def _to(stored, device: torch.device):
        return stored.to(device) if isinstance(stored, torch.Tensor) else tuple(x.to(device) for x in stored)

    def nbytes(self) -> int:
        """Bytes held by the hash (2 per coordinate for k < 2^15, else 5; none on the CPU above HELD_MAX_D)."""
        return sum(
            h.numel() * h.element_size() if isinstance(h, torch.Tensor) else h[0].numel() * 5
            for h in self._hash.values()
        )


def project(grads: Mapping[str, torch.Tensor] | torch.Tensor, k: int, seed: int = 0) -> torch.Tensor:
    """One-shot CountSketch of `{name: [b, *shape]}` or a flat [b, D] into [b, k]; build a `CountSketch` to reuse it."""
    rows = {FLAT: grads} if isinstance(grads, torch.Tensor) else grads
    return CountSketch({n: g[0].numel() for n, g in rows.items()}, k, seed).project(grads)


class NoSketch:
    """The identity "sketch": `{name: [b, *shape]}` flattened and concatenated to [b, D] (a reference for small
    models)."""

    def __init__(self, sizes: Mapping[str, int]) -> None:
        self.sizes = dict(sizes)
        self.k = self.dim = sum(self.sizes.values())

    def project(self, grads: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """[b, D] fp32, tensors in the order the sketch was built with."""
        if set(grads) != set(self.sizes):
            raise KeyError("NoSketch built for other tensors")
        return torch.cat([grads[n].reshape(grads[n].shape[0], -1).float() for n in self.sizes], dim=1)

    def add(self, name: str, g: torch.Tensor, out: torch.Tensor) -> None:
        """Write tensor `name`'s coordinates of `g` [b, *shape] into its columns of `out` [b, D]."""
        start = 0
        for n, numel in self.sizes.items():
            if n == name:
                out[:, start : start + numel] = g.reshape(g.shape[0], -1).float()
                return
            start += numel
        raise KeyError(f"NoSketch built for other tensors: {name!r}")
