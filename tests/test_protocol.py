"""The loss protocol: draws are a pure function of (protocol_seed, item_id, k)."""

import subprocess
import sys

import torch

from tda_assets.attribution.objective import DiffusionObjective
from tda_assets.attribution.protocol import LossProtocol

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
    outs = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout for _ in range(2)]
    t, e = LossProtocol(seed=7, draws=3).draws_for(IDS[:3], SHAPE, DiffusionObjective())
    assert outs[0] == outs[1] == f"{t.tolist()!r}\n{float(e.sum())}\n"
