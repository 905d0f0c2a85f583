"""Where the engine computes: device, autocast dtype for forward passes, batch size."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import torch

from .protocol_id import check_precision

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

    @classmethod
    def auto(cls, batch_size: int = DEFAULT_BATCH_ROWS) -> "Compute":
        """`cuda` with bf16 autocast when a GPU is present, else fp32 on CPU."""
        if torch.cuda.is_available():
            return cls(device="cuda", autocast_dtype="bfloat16", batch_size=batch_size)
        return cls(device="cpu", autocast_dtype=None, batch_size=batch_size)

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
        `autocast_dtype`: bf16 autocast for `bf16`, autocast switched off (even inside an outer one) for `fp32`."""
        if check_precision(precision) == "bf16":
            return torch.autocast(device_type=self.torch_device.type, dtype=torch.bfloat16)
        return torch.autocast(device_type=self.torch_device.type, enabled=False)
