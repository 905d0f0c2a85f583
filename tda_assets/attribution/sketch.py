"""A seeded CountSketch of (per-item) gradients: `D` coordinates → `k` buckets, never a dense `k × D` matrix.

Coordinate `j` of parameter tensor `name` goes to bucket `h(j)` with sign `s(j)`; `h` and `s` are drawn from a
generator seeded by `(seed, name, k)`, so the sketch of one tensor never depends on which other tensors are sketched
with it (a parameter subset's sketch is the restriction of the full model's sketch). Storage is one int32 bucket index
and one int8 sign per coordinate: O(D). `E‖Sx‖² = ‖x‖²`, `E⟨Sx, Sy⟩ = ⟨x, y⟩`; the relative error of `‖Sx‖²` has
std ≈ sqrt(2/k) for a vector whose mass is spread over many coordinates.
"""

from __future__ import annotations

from typing import Mapping

import torch

from .protocol import draw_seed

FLAT = ""  # the one "tensor name" of a flat [b, D] input


class CountSketch:
    """The CountSketch of tensors with the given per-row sizes (`{name: numel}`), into `k` dimensions."""

    def __init__(self, sizes: Mapping[str, int], k: int, seed: int = 0) -> None:
        if k < 1:
            raise ValueError(f"sketch dimension k must be at least 1, got {k}")
        self.k, self.seed, self.sizes = k, seed, dict(sizes)
        self._hash: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for name, numel in self.sizes.items():
            g = torch.Generator().manual_seed(draw_seed(seed, f"countsketch:{name}", k))
            bucket = torch.randint(0, k, (numel,), generator=g, dtype=torch.int64).to(torch.int32)
            sign = (torch.randint(0, 2, (numel,), generator=g, dtype=torch.int8) * 2 - 1).to(torch.int8)
            self._hash[name] = (bucket, sign)

    @classmethod
    def for_parameters(cls, params: Mapping[str, torch.Tensor], k: int, seed: int = 0) -> "CountSketch":
        """The sketch of gradients with respect to `params` (e.g. `adapter.parameter_subset(...)`)."""
        return cls({n: p.numel() for n, p in params.items()}, k, seed)

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
            rows = g.reshape(g.shape[0], -1)
            if rows.shape[1] != self.sizes[name]:
                raise ValueError(f"{name!r}: {rows.shape[1]} coordinates per row, sketch built for {self.sizes[name]}")
            bucket, sign = (x.to(first.device) for x in self._hash[name])
            out.index_add_(1, bucket, rows.float() * sign)
        return out

    def nbytes(self) -> int:
        """Bytes held by the hash (5 per coordinate)."""
        return sum(b.numel() * 4 + s.numel() for b, s in self._hash.values())


def project(grads: Mapping[str, torch.Tensor] | torch.Tensor, k: int, seed: int = 0) -> torch.Tensor:
    """One-shot CountSketch of `{name: [b, *shape]}` or a flat [b, D] into [b, k]; build a `CountSketch` to reuse it."""
    rows = {FLAT: grads} if isinstance(grads, torch.Tensor) else grads
    return CountSketch({n: g[0].numel() for n, g in rows.items()}, k, seed).project(grads)


class NoSketch:
    """The identity "sketch": `{name: [b, *shape]}` flattened and concatenated to [b, D] (a reference for small models)."""

    def __init__(self, sizes: Mapping[str, int]) -> None:
        self.sizes = dict(sizes)
        self.k = self.dim = sum(self.sizes.values())

    def project(self, grads: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """[b, D] fp32, tensors in the order the sketch was built with."""
        if set(grads) != set(self.sizes):
            raise KeyError("NoSketch built for other tensors")
        return torch.cat([grads[n].reshape(grads[n].shape[0], -1).float() for n in self.sizes], dim=1)
