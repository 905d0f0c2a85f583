"""Where the engine computes: device, autocast dtype for forward passes, batch size."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import torch

# Rows (item-draws) per forward pass. On CPU the embedded denoiser is fastest at small batches: its feed-forward
# intermediate leaves L2 beyond ~64 rows (tests/benchmarks/bench_scale.py, 2026-11-26: 1 thread, bare forward 63 GFLOP/s
# = 62% of the fp32 matmul peak at 64 rows against 45% at 256; the loss pipeline at 2 threads 649 item-draws/s at 32
# rows against 449 at 256). On a GPU raise it (TDA_BATCH_SIZE, e.g. 256).
DEFAULT_BATCH_ROWS = 32


@dataclass(frozen=True)
class Compute:
    """Device placement: forward passes may autocast (bf16 on GPU); weights that unlearning changes stay fp32."""

    device: str = "cpu"
    autocast_dtype: str | None = None  # "bfloat16" | "float16" | None
    batch_size: int = DEFAULT_BATCH_ROWS  # rows (item-draws) per forward pass
    # Per-draw losses (baseline, unlearned: the scores) without autocast. bf16 rescoring agrees with fp32 at the
    # default strength but not at a weak one: on the embedded test model, query loss ×1.02, Spearman 0.76–0.85
    # (Jaccard@10 0.82) against fp32, while a bf16 unlearning rescored in fp32 gave ≥ 0.998 (Jaccard@10 1.0).
    # Baseline and unlearned losses must be computed with the same setting.
    fp32_losses: bool = False

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

    def loss_autocast(self) -> contextlib.AbstractContextManager:
        """Autocast context for per-draw loss measurement: `autocast()`, or none when `fp32_losses`."""
        return contextlib.nullcontext() if self.fp32_losses else self.autocast()
