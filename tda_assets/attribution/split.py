"""The `bf16-split` loss precision: bf16 matmuls in which the unlearned change δ is a term of its own, so that a δ below
half a bf16 step of θ0 still moves the loss (under plain bf16 autocast `bf16(θ0 + δ) == bf16(θ0)`: DESIGN §6).

Inside `bf16_split`, every `F.linear` / `F.conv1d` returns its output in fp32 (the bf16 product, upcast exactly), and
one whose weight or bias is shifted by `shifted_parameters` computes `f(x; θ0) + f(x; scale·δ)` with `f(x; scale·δ)` a
second, bias-free matmul (plus `scale·δ_bias`) instead of `f(x; θ0 + scale·δ)`. The fp32 outputs hold the small term:
a bf16 output would round it away again, and they are fp32 with δ = 0 too, so the baseline and the unlearned model
run the same arithmetic and differ by the δ term alone. Parameters of other modules (LayerNorm: fp32 under autocast)
keep the `θ0 + δ` weight. Cost: the changed layers' matmuls run twice, and activations between matmuls are fp32.
Limit: an output that feeds the next bf16 matmul directly (attention's query, key, value) is rounded there again.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Callable, Iterator, Protocol

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

SPLIT_MODULES = (torch.nn.Linear, torch.nn.Conv1d)  # what bf16 autocast runs as a bf16 matmul / convolution
_MATMULS = (F.linear, F.conv1d)
_ACTIVE: contextvars.ContextVar[bool] = contextvars.ContextVar("tda_bf16_split", default=False)


class Step(Protocol):
    """A shifted parameter's current change (`scale · direction`), read when a forward uses it."""

    def step(self) -> torch.Tensor: ...


_TERMS: dict[int, tuple[torch.Tensor, Step]] = {}  # id(θ0 parameter) → (θ0, its shift), while a shift is registered


def split_active() -> bool:
    """Whether forward passes here evaluate shifted matmul parameters as a separate term (inside `bf16_split`)."""
    return _ACTIVE.get()


def splits(owner: torch.nn.Module, attr: str) -> bool:
    """Whether parameter `attr` of module `owner` is consumed by a matmul that `bf16_split` evaluates as two terms."""
    return isinstance(owner, SPLIT_MODULES) and attr in ("weight", "bias")


@contextlib.contextmanager
def delta_term(theta0: torch.Tensor, shift: Step) -> Iterator[None]:
    """Register `shift` as the separate term of parameter `theta0` (the tensor a parametrization hands its matmul)."""
    _TERMS[id(theta0)] = (theta0, shift)
    try:
        yield
    finally:
        _TERMS.pop(id(theta0), None)


def _term(tensor: torch.Tensor | None) -> Step | None:
    entry = None if tensor is None else _TERMS.get(id(tensor))
    return entry[1] if entry is not None and entry[0] is tensor else None


def _split_matmul(func: Callable, args: tuple, kwargs: dict) -> torch.Tensor:
    """`func(x, θ0, b0)` in fp32 plus the weight's term `func(x, scale·δ)` and the bias's `scale·δ_b`, when shifted."""
    names = ("input", "weight", "bias")
    given = dict(zip(names, args)) | {k: v for k, v in kwargs.items() if k in names}
    rest, options = args[3:], {k: v for k, v in kwargs.items() if k not in names}
    x, device = given["input"], given["input"].device.type
    if x.dtype == torch.float32 and torch.is_autocast_enabled(device):  # the cast autocast makes, once for both terms
        x = x.to(torch.get_autocast_dtype(device))
    out = func(x, given["weight"], given.get("bias"), *rest, **options).float()
    weight_term, bias_term = _term(given["weight"]), _term(given.get("bias"))
    if weight_term is not None:
        out = out + func(x, weight_term.step(), None, *rest, **options).float()
    if bias_term is not None:
        step = bias_term.step().float()
        out = out + (step if func is F.linear else step.view(-1, 1))  # conv1d: [N, C, L] or [C, L]
    return out


class _SplitMode(TorchFunctionMode):
    """Routes `F.linear` / `F.conv1d` through `_split_matmul` while `bf16_split` is active in this context."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _MATMULS and _ACTIVE.get():
            return _split_matmul(func, args, kwargs)
        return func(*args, **kwargs)


@contextlib.contextmanager
def bf16_split(device_type: str) -> Iterator[None]:
    """Forward passes under bf16 autocast whose shifted matmul parameters are evaluated as `θ0` and `δ` terms."""
    token = _ACTIVE.set(True)
    try:
        with torch.autocast(device_type=device_type, dtype=torch.bfloat16), _SplitMode():
            yield
    finally:
        _ACTIVE.reset(token)
