"""The loss protocol: draws `(t, ε)` that are a pure function of `(protocol_seed, item_id, k)`."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace

import torch

from .objective import DiffusionObjective
from .protocol_id import check_precision, protocol_id


def draw_seed(protocol_seed: int, item_id: str, k: int) -> int:
    """A 63-bit generator seed from `(protocol_seed, item_id, k)`, identical on every machine."""
    digest = hashlib.blake2b(f"{protocol_seed}\x1f{item_id}\x1f{k}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


@dataclass(frozen=True)
class LossProtocol:
    """`draws` fixed draws per item from the objective's timestep distribution, seeded by `seed`.

    `first_draw` > 0 makes a window of a protocol: draws `first_draw … first_draw + draws − 1` of the same items
    (multi-fidelity scoring evaluates a few draws first and the rest later, never a draw twice).
    `precision` (one of `protocol_id.LOSS_PRECISIONS`) is what the losses are measured in, whatever the compute's
    autocast: `bf16` and `bf16-split` are other protocols (ids ending in `-bf16`, `-bf16split`), so losses of two
    precisions are never compared.
    """

    seed: int = 0
    draws: int = 16
    first_draw: int = 0
    precision: str = "fp32"

    def __post_init__(self) -> None:
        check_precision(self.precision)

    @property
    def protocol_id(self) -> str:
        return protocol_id(self.seed, self.draws, self.first_draw, self.precision)

    def window(self, start: int, stop: int) -> "LossProtocol":
        """Draws `start … stop − 1` of this protocol (indices relative to its first draw)."""
        if not 0 <= start < stop <= self.draws:
            raise ValueError(f"draw window [{start}, {stop}) is not within the protocol's {self.draws} draws")
        return replace(self, draws=stop - start, first_draw=self.first_draw + start)

    def draws_for(
        self, item_ids: list[str], latent_shape: tuple[int, ...], objective: DiffusionObjective
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`t` [b, K] and `ε` [b, K, *latent_shape] on CPU; draw k of an item never depends on the batch."""
        b, k = len(item_ids), self.draws
        t = torch.empty(b, k)
        eps = torch.empty(b, k, *latent_shape)
        g = torch.Generator()
        for i, item_id in enumerate(item_ids):
            for j in range(k):
                g.manual_seed(draw_seed(self.seed, item_id, self.first_draw + j))
                t[i, j] = objective.sample_t(1, g)[0]
                eps[i, j] = torch.randn(latent_shape, generator=g)
        return t, eps
