"""Where the engine computes: device, autocast dtype for forward passes, batch size."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import torch

from .protocol_id import check_precision
from .split import bf16_split

# Rows (item-draws) per forward pass. On CPU the embedded denoiser is fastest at small batches: its feed-forward
# intermediate leaves L2 beyond ~64 rows (tests/benchmarks/bench_scale.py, 2026-11-26: 1 thread, bare forward 63 GFLOP/s
# = 62% of the fp32 matmul peak at 64 rows against 45% at 256; the loss pipeline at 2 threads 649 item-draws/s at 32
# rows against 449 at 256). On a GPU raise it (TDA_BATCH_SIZE, e.g. 256).
DEFAULT_BATCH_ROWS = 32


@dataclass(frozen=True)
class Compute:
    """Device placement: forward passes may autocast (bf16 on GPU); weights that unlearning changes stay fp32.

    `autocast_dtype` governs the unlearning step, the Fisher, training and sampling; the protocol's per-draw losses
    are measured at the protocol's own precision (`loss_autocast`), which is part of their identity.
    """

    device: str = "cpu"
    autocast_dtype: str | None = None  # "bfloat16" | "float16" | None
    batch_size: int = DEFAULT_BATCH_ROWS  # rows (item-draws) per forward pass
    grad_rows: int | None = None  # rows per pass of a gradient (accumulated over passes); None: all in one pass

    def __post_init__(self) -> None:
        if self.batch_size < 1 or (self.grad_rows is not None and self.grad_rows < 1):
            raise ValueError(
                f"rows per pass must be at least 1 (batch_size {self.batch_size}, grad_rows "
                f"{self.grad_rows}): set TDA_BATCH_SIZE / TDA_GRAD_ROWS to a positive number"
            )

    @classmethod
    def auto(cls, batch_size: int = DEFAULT_BATCH_ROWS, grad_rows: int | None = None) -> "Compute":
        """`cuda` with bf16 autocast when a GPU is present, else fp32 on CPU."""
        if torch.cuda.is_available():
            return cls(device="cuda", autocast_dtype="bfloat16", batch_size=batch_size, grad_rows=grad_rows)
        return cls(device="cpu", autocast_dtype=None, batch_size=batch_size, grad_rows=grad_rows)

    @property
    def precision(self) -> str:
        """What the unlearning step, the Fisher and training compute in (the autocast dtype, or `fp32`): it changes
        their numbers, so the Fisher and each delta record it."""
        return self.autocast_dtype or "fp32"

    @property
    def backward_rows(self) -> int | None:
        """Rows per pass of the gradients (an item's protocol draws for the Fisher and the gradient store, the query's
        random copies for the unlearning step and its search); None: all of them in one pass. A backward pass holds
        every row's activations: ≈ 2 GB a row at Stable Audio Open's shapes in fp32 (TDA_GRAD_ROWS lowers it)."""
        return self.grad_rows

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.device)

    @contextlib.contextmanager
    def autocast(self) -> Iterator[None]:
        """Autocast context for forward passes (a no-op when `autocast_dtype` is None)."""
        if self.autocast_dtype is None:
            yield
            return
        dtype = getattr(torch, self.autocast_dtype)
        with torch.autocast(device_type=self.torch_device.type, dtype=dtype):
            yield

    def loss_autocast(self, precision: str) -> contextlib.AbstractContextManager:
        """Context for measuring protocol losses at `precision` (LossProtocol.precision) on this device, whatever
        `autocast_dtype`: bf16 autocast for `bf16`, autocast switched off (even inside an outer one) for `fp32`, and
        for `bf16-split` bf16 autocast with shifted matmul parameters evaluated as separate terms (split.py)."""
        if check_precision(precision) == "bf16-split":
            return bf16_split(self.torch_device.type)
        if precision == "bf16":
            return torch.autocast(device_type=self.torch_device.type, dtype=torch.bfloat16)
        return torch.autocast(device_type=self.torch_device.type, enabled=False)
