"""Memory a step needs checked before it starts: a step that adds model-sized sets of tensors (4.2 GB each at Stable
Audio Open's 1.06 B parameters) and cannot fit them stops at once, naming the memory and the setting that lowers it."""

from __future__ import annotations

import torch


def available_bytes(device: torch.device | str) -> int | None:
    """Free memory on `device`: a GPU's free bytes, a CPU's `MemAvailable` (None where it cannot be told)."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def require_memory(device: torch.device | str, sets: int, set_bytes: int, what: str, fix: str) -> None:
    """Raise MemoryError unless `device` has room for `sets` more tensors sets of `set_bytes` each (activations come on
    top, so a step that fails this would fail later, after its slow part)."""
    free, needed = available_bytes(device), sets * set_bytes
    if free is not None and needed > free:
        raise MemoryError(
            f"{what} needs {needed / 1e9:.1f} GB more memory on {device} ({sets} × {set_bytes / 1e9:.2f} GB, "
            f"one per model-sized set of tensors it holds) and {free / 1e9:.1f} GB is available: {fix}"
        )
