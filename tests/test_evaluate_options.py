"""`tda evaluate`'s arguments derive from one dataclass, EvaluateOptions: names, defaults, environment overrides."""

from __future__ import annotations

from dataclasses import fields

import pytest

from resources.env import Env
from tda_assets.cli import parser
from tda_assets.experiments.options import CF_TRAIN_STEPS_CAP, EvaluateOptions, env_variable

ENV_OPTIONS = [f.name for f in fields(EvaluateOptions) if f.metadata["env"]]


@pytest.fixture
def clean_env(monkeypatch):
    for name in ENV_OPTIONS:
        monkeypatch.delenv(env_variable(name), raising=False)
    return monkeypatch


def _parsed(argv: list[str]) -> EvaluateOptions:
    args = parser().parse_args(["evaluate", *argv])
    return EvaluateOptions(**{f.name: getattr(args, f.name) for f in fields(EvaluateOptions)})


def test_evaluate_takes_one_argument_per_option_with_its_default(clean_env):
    assert _parsed([]) == EvaluateOptions()
    assert EvaluateOptions().si_targets == 32 and EvaluateOptions().rep_sources == 20


def test_evaluate_arguments_are_the_options_names_with_dashes(clean_env):
    options = _parsed(["--grid-queries", "0", "--cf-k", "3", "--skip-counterfactual", "--si-configs", "default"])
    assert (options.grid_queries, options.cf_k, options.skip_counterfactual) == (0, 3, True)
    assert options.self_influence_configs == ["default"]


def test_the_environment_variables_override_the_defaults(clean_env):
    clean_env.setenv("TDA_SI_TARGETS", "7")
    clean_env.setenv("TDA_GRID_QUERIES", "0")  # 0 (all queries) is a value, not unset
    clean_env.setenv("TDA_CF_TRAIN_STEPS", "120")
    options = _parsed(["--rep-sources", "2"])
    assert (options.si_targets, options.grid_queries, options.cf_train_steps, options.rep_sources) == (7, 0, 120, 2)


def test_every_overridable_option_is_an_env_setting_read_from_its_variable(clean_env):
    for n, name in enumerate(ENV_OPTIONS, 1):
        clean_env.setenv(env_variable(name), str(n))
    env = Env.read()
    assert [getattr(env, name) for name in ENV_OPTIONS] == list(range(1, len(ENV_OPTIONS) + 1))
    assert env_variable("si_targets") == "TDA_SI_TARGETS"


def test_a_bad_variable_names_itself(clean_env):
    clean_env.setenv("TDA_REP_SOURCES", "many")
    with pytest.raises(ValueError, match="TDA_REP_SOURCES='many' is not an integer"):
        Env.read()


def test_counterfactual_steps_are_the_checkpoints_capped_unless_given():
    assert EvaluateOptions().counterfactual_steps(1000) == CF_TRAIN_STEPS_CAP
    assert EvaluateOptions().counterfactual_steps(60) == 60
    assert EvaluateOptions(cf_train_steps=900).counterfactual_steps(60) == 900
