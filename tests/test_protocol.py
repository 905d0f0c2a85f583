"""The loss protocol: draws are a pure function of (protocol_seed, item_id, k)."""

import subprocess
import sys

import pytest
import torch

from resources.build import build_resources
from resources.env import Env
from tda_assets.attribution.objective import DiffusionObjective
from tda_assets.attribution.protocol import LossProtocol
from tda_assets.attribution.protocol_id import protocol_id

SHAPE = (4, 8)
IDS = [f"a00-{i:04d}" for i in range(10)]


def test_draws_do_not_depend_on_batch_size():
    p = LossProtocol(seed=3, draws=5)
    t_all, e_all = p.draws_for(IDS, SHAPE, DiffusionObjective())
    t_small, e_small = p.draws_for(IDS[4:6], SHAPE, DiffusionObjective())
    assert torch.equal(t_all[4:6], t_small) and torch.equal(e_all[4:6], e_small)


def test_draws_do_not_depend_on_order():
    p = LossProtocol(seed=3, draws=5)
    t, e = p.draws_for(IDS, SHAPE, DiffusionObjective())
    t_rev, e_rev = p.draws_for(IDS[::-1], SHAPE, DiffusionObjective())
    assert torch.equal(t, t_rev.flip(0)) and torch.equal(e, e_rev.flip(0))


def test_draw_k_is_the_same_whatever_the_number_of_draws():
    t3, e3 = LossProtocol(seed=1, draws=3).draws_for(IDS[:2], SHAPE, DiffusionObjective())
    t8, e8 = LossProtocol(seed=1, draws=8).draws_for(IDS[:2], SHAPE, DiffusionObjective())
    assert torch.equal(t3, t8[:, :3]) and torch.equal(e3, e8[:, :3])


def test_draws_differ_between_items_and_seeds():
    t, _ = LossProtocol(seed=0, draws=4).draws_for(IDS[:2], SHAPE, DiffusionObjective())
    t_other, _ = LossProtocol(seed=1, draws=4).draws_for(IDS[:2], SHAPE, DiffusionObjective())
    assert not torch.equal(t[0], t[1]) and not torch.equal(t, t_other)


def test_draws_are_identical_in_two_separate_processes():
    code = (
        "from tda_assets.attribution.protocol import LossProtocol;"
        "from tda_assets.attribution.objective import DiffusionObjective;"
        f"t, e = LossProtocol(seed=7, draws=3).draws_for({IDS[:3]!r}, {SHAPE!r}, DiffusionObjective());"
        "print(repr(t.tolist())); print(float(e.sum()))"
    )
    outs = [
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
        for _ in range(2)
    ]
    t, e = LossProtocol(seed=7, draws=3).draws_for(IDS[:3], SHAPE, DiffusionObjective())
    assert outs[0] == outs[1] == f"{t.tolist()!r}\n{float(e.sum())}\n"


def test_the_precision_is_part_of_the_protocol_id_and_fp32_ids_are_unchanged():
    assert LossProtocol(seed=0, draws=16).protocol_id == protocol_id(0, 16) == "s0-k16"  # existing roots keep their ids
    bf16 = LossProtocol(seed=0, draws=16, precision="bf16")
    assert bf16.protocol_id == protocol_id(0, 16, precision="bf16") == "s0-k16-bf16"
    assert bf16.window(2, 7) == LossProtocol(seed=0, draws=5, first_draw=2, precision="bf16")
    assert (
        bf16.window(2, 7).protocol_id == "s0-k5-from2-bf16"
        and LossProtocol(seed=0).window(2, 7).protocol_id == "s0-k5-from2"
    )
    t, e = LossProtocol(seed=3, draws=4).draws_for(IDS[:2], SHAPE, DiffusionObjective())
    t_bf, e_bf = LossProtocol(seed=3, draws=4, precision="bf16").draws_for(IDS[:2], SHAPE, DiffusionObjective())
    assert torch.equal(t, t_bf) and torch.equal(e, e_bf)  # the same draws: only what the losses are measured in differs


def test_an_unknown_precision_is_refused_naming_the_choices_and_the_variable():
    for bad in ("fp16", "bfloat16", ""):
        with pytest.raises(ValueError, match=r"fp32, bf16.*TDA_LOSS_PRECISION"):
            LossProtocol(precision=bad)
        with pytest.raises(ValueError, match="TDA_LOSS_PRECISION"):
            protocol_id(0, 16, precision=bad)


def test_the_environment_sets_the_loss_precision_of_the_protocol_and_its_id(monkeypatch):
    monkeypatch.delenv("TDA_LOSS_PRECISION", raising=False)
    monkeypatch.setenv("TDA_PROTOCOL_SEED", "2")
    monkeypatch.setenv("TDA_DRAWS", "8")
    env = Env.read()
    assert env.loss_precision == "fp32" and env.protocol_id == "s2-k8"
    monkeypatch.setenv("TDA_LOSS_PRECISION", "BF16 ")
    env = Env.read()
    assert env.loss_precision == "bf16" and env.protocol_id == "s2-k8-bf16"
    protocol = build_resources(env)["protocol"].protocol()  # what the steps measure under is what `tda queries` names
    assert protocol.precision == "bf16" and protocol.protocol_id == env.protocol_id
    monkeypatch.setenv("TDA_LOSS_PRECISION", "fp16")
    with pytest.raises(ValueError, match=r"'fp16'.*TDA_LOSS_PRECISION"):
        Env.read()
