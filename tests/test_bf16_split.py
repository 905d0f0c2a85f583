"""The `bf16-split` loss precision (issue 21): bf16 matmuls that keep an unlearned change below half a bf16 step of θ0,
which plain bf16 autocast rounds away (DESIGN §6)."""

from __future__ import annotations

import pytest
import torch
from torch.nn.utils import parametrize

from resources.env import Env
from tda_assets.attribution.adapter import ItemBatch, apply_delta, shifted_parameters
from tda_assets.attribution.devices import Compute
from tda_assets.attribution.losses import batch_losses, diffusion_loss, expand_draws
from tda_assets.attribution.protocol import LossProtocol
from tda_assets.attribution.protocol_id import LOSS_PRECISIONS, precision_twin, protocol_id
from tda_assets.attribution.split import bf16_split
from tda_assets.models.embedded.model import EmbeddedAdapter

PRECISIONS = {p: LossProtocol(draws=4, precision=p) for p in ("fp32", "bf16", "bf16-split")}


@pytest.fixture(scope="module")
def model() -> tuple[EmbeddedAdapter, ItemBatch, dict[str, torch.Tensor]]:
    """The embedded denoiser with its Linear weights on the bf16 grid, 6 items, and a delta on those weights whose every
    entry is 0.45 of half a bf16 step of θ0 (so bf16(θ0 + δ) == bf16(θ0)), signed to raise item 0's loss."""
    adapter = EmbeddedAdapter.new()
    g = torch.Generator().manual_seed(0)
    c, t = adapter.latent_shape
    cond = {
        "encoder_hidden_states": torch.randn(6, 6, 384, generator=g),
        "global_hidden_states": torch.randn(6, 1, 384, generator=g),
    }
    items = ItemBatch([f"i{k}" for k in range(6)], torch.randn(6, c, t, generator=g), cond, torch.ones(6, t))
    params = {
        n: p
        for n, p in adapter.parameter_subset("all").items()
        if isinstance(adapter.denoiser.get_submodule(n.rpartition(".")[0]), torch.nn.Linear)
    }
    with torch.no_grad():
        for p in params.values():
            p.copy_(p.bfloat16().float())
    t0, e0 = LossProtocol(draws=4).draws_for(items.item_ids[:1], adapter.latent_shape, adapter.objective)
    z, cnd, tt, ee, _ = expand_draws(items.select([0]), t0, e0, adapter.device)
    grads = torch.autograd.grad(diffusion_loss(adapter, z, cnd, tt, ee).mean(), list(params.values()))
    return adapter, items, {n: below_half_step(p, grad.sign()) for (n, p), grad in zip(params.items(), grads)}


def below_half_step(p: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    """`sign` × 0.45 of half a bf16 step of each entry of `p` (the step below a power of two is half the one above:
    0.45 keeps bf16(p + δ) == bf16(p) there too, for `p` on the bf16 grid)."""
    return sign * 0.45 * torch.exp2(torch.floor(torch.log2(p.detach().abs().clamp_min(1e-30))) - 8)


def losses(adapter, items, precision: str, delta: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    if delta is None:
        return batch_losses(adapter, items, PRECISIONS[precision], Compute()).loss.double()
    with apply_delta(adapter.denoiser, delta):
        return batch_losses(adapter, items, PRECISIONS[precision], Compute()).loss.double()


def test_a_delta_below_half_a_bf16_step_moves_bf16_split_losses_as_fp32_while_bf16_ones_stay_at_baseline(model):
    adapter, items, delta = model
    change = {p: (losses(adapter, items, p, delta) - losses(adapter, items, p)).mean(dim=1) for p in PRECISIONS}
    assert torch.all(change["bf16"] == 0)  # every entry rounds back to θ0: the unlearning is invisible
    assert change["fp32"][0] > 1e-3  # the query (item 0) really moves
    assert float((change["bf16-split"] - change["fp32"]).norm() / change["fp32"].norm()) < 0.1
    assert float(change["bf16-split"][0] / change["fp32"][0]) == pytest.approx(1.0, abs=0.1)


def test_bf16_split_at_scale_zero_is_its_baseline_and_a_scale_is_the_scaled_delta_bit_for_bit(model):
    adapter, items, delta = model
    base = losses(adapter, items, "bf16-split")
    half = losses(adapter, items, "bf16-split", {n: d * 0.5 for n, d in delta.items()})
    with shifted_parameters(adapter.denoiser, delta) as shifts:
        for shift in shifts.values():
            shift.scale = 0.0
        at_zero = batch_losses(adapter, items, PRECISIONS["bf16-split"], Compute()).loss.double()
        for shift in shifts.values():
            shift.scale = 0.5  # as the step-size search moves it
        at_half = batch_losses(adapter, items, PRECISIONS["bf16-split"], Compute()).loss.double()
    assert torch.equal(at_zero, base) and torch.equal(at_half, half) and not torch.equal(half, base)


def test_theta0_is_bit_exact_and_unparametrized_after_bf16_split_losses_under_a_delta(model):
    adapter, items, delta = model
    before = {n: (p, p.detach().clone()) for n, p in adapter.denoiser.named_parameters()}
    base = losses(adapter, items, "bf16-split")
    losses(adapter, items, "bf16-split", delta)
    after = dict(adapter.denoiser.named_parameters())
    assert set(after) == set(before) and all(after[n] is p and torch.equal(p, v) for n, (p, v) in before.items())
    assert not any(parametrize.is_parametrized(m) for m in adapter.denoiser.modules())
    assert torch.equal(losses(adapter, items, "bf16-split"), base)  # and no term is left behind


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_a_linear_or_conv1d_weight_and_bias_change_is_a_separate_term_that_fp32_agrees_with(kind):
    torch.manual_seed(0)
    if kind == "linear":
        layer, x = torch.nn.Linear(64, 32), torch.randn(4, 10, 64)
    else:
        layer, x = torch.nn.Conv1d(32, 16, 3, padding=1), torch.randn(4, 32, 10)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(p.bfloat16().float())
    delta = {n: below_half_step(p, torch.randn_like(p).sign()) for n, p in layer.named_parameters()}
    contexts = {
        "fp32": lambda: torch.autocast("cpu", enabled=False),
        "bf16": lambda: torch.autocast("cpu", dtype=torch.bfloat16),
        "bf16-split": lambda: bf16_split("cpu"),
    }
    change = {}
    with torch.no_grad():
        for name, context in contexts.items():
            with context():
                base = layer(x).double()
            with apply_delta(layer, delta), context():
                change[name] = layer(x).double() - base
    assert torch.all(change["bf16"] == 0)
    assert float((change["bf16-split"] - change["fp32"]).norm() / change["fp32"].norm()) < 0.01


def test_bf16_split_is_its_own_protocol_and_a_precision_twin_of_the_others():
    split, bf16, fp32 = (protocol_id(0, 16, precision=p) for p in ("bf16-split", "bf16", "fp32"))
    assert split == "s0-k16-bf16split" and len({split, bf16, fp32}) == 3
    assert precision_twin(split, fp32) and precision_twin(split, bf16) and precision_twin(bf16, split)
    assert precision_twin(protocol_id(0, 4, 2, "bf16-split"), protocol_id(0, 4, 2))
    assert not precision_twin(split, protocol_id(0, 8, precision="bf16-split")) and not precision_twin(split, split)
    assert not precision_twin(split, protocol_id(1, 16, precision="bf16"))


def test_the_environment_selects_bf16_split_and_a_bad_value_names_every_choice(monkeypatch):
    monkeypatch.setenv("TDA_LOSS_PRECISION", " BF16-Split")
    assert Env.read().loss_precision == "bf16-split" and Env.read().protocol_id.endswith("-bf16split")
    monkeypatch.setenv("TDA_LOSS_PRECISION", "bf16split")
    with pytest.raises(ValueError) as caught:
        Env.read()
    assert all(p in str(caught.value) for p in LOSS_PRECISIONS) and "TDA_LOSS_PRECISION" in str(caught.value)
    assert "fp32, bf16, bf16-split" in str(caught.value)
