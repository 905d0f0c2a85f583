"""Memory a step needs checked before it starts: a step that adds model-sized sets of tensors (4.2 GB each at Stable
Audio Open's 1.06 B parameters) and cannot fit them stops at once, naming the memory and the setting that lowers it;
and the CPU allocator set to return what a step frees (`return_freed_memory`): the process holds what is live."""

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


HEAP_MMAP_THRESHOLD = 1 << 20  # bytes: a CPU block this large or larger is its own mapping, unmapped when freed


def return_freed_memory(threshold: int = HEAP_MMAP_THRESHOLD) -> bool:
    """Have glibc map every CPU block of `threshold` bytes or more on its own, so freeing it returns the memory at once.

    By default glibc raises its mapping threshold to the largest block freed (up to 32 MB): the gradient- and
    activation-sized blocks of every later pass then come from the heap and, once freed, stay in the process's memory,
    fragmented. The Fisher step measured 4.5 model-sized sets above the weights by RSS that way against 2 live (its sum
    and one pass's gradient). Setting the threshold fixes it (and stops glibc's adjusting it); what earlier steps of
    the process freed is given back too (`malloc_trim`). False where the C library is not glibc."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name) if name else None
    if libc is None or not hasattr(libc, "mallopt") or not hasattr(libc, "gnu_get_libc_version"):
        return False
    m_mmap_threshold = -3  # glibc's M_MMAP_THRESHOLD
    if not libc.mallopt(m_mmap_threshold, int(threshold)):
        return False
    libc.malloc_trim(0)
    return True
