"""bf16-split against fp32 on the embedded denoiser (docs/configuration.md, "Loss precision"; run on demand).

`EmbeddedAdapter.new()` with its weights put on the bf16 grid (so plain bf16 sees none of a sub-half-step change);
each parameter subset's Linear weights shifted by 0.45 of half a bf16 step, signed to raise item 0's loss; prints the
per-item mean loss change over 6 items × 4 draws under fp32, bf16 and bf16-split, and bf16-split's relative error
against fp32.

    OMP_NUM_THREADS=1 .venv/bin/python -m tests.benchmarks.bench_bf16_split
"""

from __future__ import annotations

import torch

from tda_assets.attribution.adapter import ItemBatch, apply_delta
from tda_assets.attribution.devices import Compute
from tda_assets.attribution.losses import batch_losses, diffusion_loss, expand_draws
from tda_assets.attribution.protocol import LossProtocol
from tda_assets.models.embedded.model import EmbeddedAdapter

SUBSETS = ("all", "self_attention", "cross_attention_kv")
ITEMS, DRAWS = 6, 4


def items_of(adapter: EmbeddedAdapter, n: int) -> ItemBatch:
    g = torch.Generator().manual_seed(0)
    c, t = adapter.latent_shape
    cond = {
        "encoder_hidden_states": torch.randn(n, 6, 384, generator=g),
        "global_hidden_states": torch.randn(n, 1, 384, generator=g),
    }
    return ItemBatch([f"i{k}" for k in range(n)], torch.randn(n, c, t, generator=g), cond, torch.ones(n, t))


def sub_half_step_delta(adapter: EmbeddedAdapter, items: ItemBatch, subset: str) -> dict[str, torch.Tensor]:
    """0.45 of half a bf16 step of each Linear weight of `subset`, signed along the gradient of item 0's loss."""
    params = {
        n: p
        for n, p in adapter.parameter_subset(subset).items()
        if isinstance(adapter.denoiser.get_submodule(n.rpartition(".")[0]), torch.nn.Linear)
    }
    protocol = LossProtocol(draws=DRAWS)
    t, eps = protocol.draws_for(items.item_ids[:1], adapter.latent_shape, adapter.objective)
    z, cond, tt, ee, _ = expand_draws(items.select([0]), t, eps, adapter.device)
    grads = torch.autograd.grad(diffusion_loss(adapter, z, cond, tt, ee).mean(), list(params.values()))
    step = lambda p: torch.exp2(torch.floor(torch.log2(p.detach().abs().clamp_min(1e-30))) - 8)  # noqa: E731
    return {n: g.sign() * 0.45 * step(p) for (n, p), g in zip(params.items(), grads)}


def main() -> None:
    adapter = EmbeddedAdapter.new()
    with torch.no_grad():
        for p in adapter.denoiser.parameters():
            p.copy_(p.bfloat16().float())
    items = items_of(adapter, ITEMS)
    for subset in SUBSETS:
        delta = sub_half_step_delta(adapter, items, subset)
        change = {}
        for precision in ("fp32", "bf16", "bf16-split"):
            protocol = LossProtocol(draws=DRAWS, precision=precision)
            base = batch_losses(adapter, items, protocol, Compute()).loss.double()
            with apply_delta(adapter.denoiser, delta):
                change[precision] = (batch_losses(adapter, items, protocol, Compute()).loss.double() - base).mean(1)
        err = ((change["bf16-split"] - change["fp32"]).norm() / change["fp32"].norm()).item()
        print(
            f"{subset}: item 0 change fp32 {change['fp32'][0]:.2e}, bf16 {change['bf16'][0]:.2e}, "
            f"bf16-split {change['bf16-split'][0]:.2e}; bf16-split relative error over {ITEMS} items {err:.3f}"
        )


if __name__ == "__main__":
    main()
