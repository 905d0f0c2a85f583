"""Where the engine computes: device, autocast dtype for forward passes, batch size."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import torch


@dataclass(frozen=True)
class Compute:
    """Device placement: forward passes may autocast (bf16 on GPU); weights that unlearning changes stay fp32."""

    device: str = "cpu"
    autocast_dtype: str | None = None  # "bfloat16" | "float16" | None
    batch_size: int = 256  # rows (item-draws) per forward pass

    @classmethod
    def auto(cls, batch_size: int = 256) -> "Compute":
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
