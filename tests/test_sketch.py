"""CountSketch: inner products are preserved within the sketch's stated error, without a dense k × D matrix."""

import math

import pytest
import torch

from tda_assets.attribution.sketch import CountSketch, project

D, K = 100_000, 4096


def test_squared_norms_within_five_std_of_sqrt_2_over_k():
    x = torch.randn(8, D, generator=torch.Generator().manual_seed(1))
    sx = project(x, K, seed=3)
    rel = sx.pow(2).sum(1) / x.pow(2).sum(1) - 1
    assert rel.abs().max() < 5 * math.sqrt(2 / K)


def test_inner_products_of_correlated_pairs():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(6, D, generator=g)
    y = 0.7 * x + 0.3 * torch.randn(6, D, generator=g)
    sketch = CountSketch({"": D}, K, seed=5)
    sx, sy = sketch.project(x), sketch.project(y)
    exact = (x * y).sum(1)
    # std of <Sx,Sy> - <x,y> is about sqrt((|x|²|y|² + <x,y>²) / k)
    std = ((x.pow(2).sum(1) * y.pow(2).sum(1) + exact.pow(2)) / K).sqrt()
    assert ((sx * sy).sum(1) - exact).abs().max() < (5 * std).max()
    cos = torch.nn.functional.cosine_similarity(sx, sy, dim=1)
    assert torch.allclose(cos, torch.nn.functional.cosine_similarity(x, y, dim=1), atol=0.05)


def test_dict_input_is_per_tensor_and_linear():
    g = torch.Generator().manual_seed(3)
    grads = {"a.weight": torch.randn(3, 40, 50, generator=g), "b.bias": torch.randn(3, 70, generator=g)}
    sketch = CountSketch({n: v[0].numel() for n, v in grads.items()}, 64, seed=1)
    full = sketch.project(grads)
    only_a = CountSketch({"a.weight": 2000}, 64, seed=1).project({"a.weight": grads["a.weight"]})
    only_b = CountSketch({"b.bias": 70}, 64, seed=1).project({"b.bias": grads["b.bias"]})
    assert torch.allclose(full, only_a + only_b, atol=1e-5)  # a subset's sketch is the restriction of the full one
    assert torch.allclose(sketch.project({n: 2 * v for n, v in grads.items()}), 2 * full, atol=1e-5)
    assert torch.equal(full, project(grads, 64, seed=1))
    assert sketch.nbytes() == 2 * 2070  # k < 2^15: bucket and sign in one int16 a coordinate


def test_wrong_tensors_are_refused():
    sketch = CountSketch({"a": 10}, 8)
    with pytest.raises(KeyError):
        sketch.project({"b": torch.zeros(1, 10)})
    with pytest.raises(ValueError):
        sketch.project({"a": torch.zeros(1, 11)})
