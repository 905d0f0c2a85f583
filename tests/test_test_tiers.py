"""The test tiers: `make test-fast` (`pytest -m "not slow"`) keeps every test that needs no trained model, Runner root
or server, and leaves out those that do; the marker comes from one rule in tests/conftest.py (`is_slow`)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from tests.conftest import is_slow
from tests.tiny_model import tiny_trained


def calls_the_tiny_model():
    return tiny_trained()


def pure_arithmetic():
    return sum(range(3))


def item(function, *fixtures: str) -> SimpleNamespace:
    """What `is_slow` reads of a collected test: its function and the closure of its fixtures."""
    return SimpleNamespace(function=function, fixturenames=["request", *fixtures])


@pytest.mark.parametrize(
    "fixture", ["trained", "trained_roots", "pipeline", "reference", "s3_root", "postgres", "webserver"]
)
def test_a_test_using_a_model_root_or_server_fixture_is_slow(fixture):
    assert is_slow(item(pure_arithmetic, "tmp_path", fixture))


def test_a_test_that_trains_the_tiny_model_in_its_body_is_slow():
    assert is_slow(item(calls_the_tiny_model))


def test_a_test_with_only_temporary_folders_and_environment_is_fast():
    assert not is_slow(item(pure_arithmetic, "tmp_path", "monkeypatch", "tmp_path_factory"))


def test_this_module_runs_in_the_fast_tier(request):
    assert not any(mark.name == "slow" for mark in request.node.iter_markers())
