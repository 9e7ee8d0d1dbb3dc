"""Judge settings from the environment, as a deployment sets them."""

from __future__ import annotations

import pytest

from onpolicy.settings import ConfigError, load_settings
from onpolicy_judge import JudgeSettings, build_judge


def test_environment_configures_scorers_pairs_and_backend(monkeypatch):
    monkeypatch.setenv(
        "ONPOLICY_JUDGE_FUNCTIONS",
        '[{"name": "concise", "weight": 2}, {"name": "regex", "params": {"pattern": "ok"}}]',
    )
    monkeypatch.setenv("ONPOLICY_JUDGE_PAIRS__MIN_MARGIN", "0.2")
    monkeypatch.setenv("ONPOLICY_JUDGE_PAIRS__STRATEGY", "all")
    monkeypatch.setenv("ONPOLICY_JUDGE_LLM__API_KEY", "sk-secret")
    settings = load_settings(JudgeSettings)
    assert [(f.name, f.weight) for f in settings.functions] == [("concise", 2.0), ("regex", 1.0)]
    assert settings.pairs.min_margin == 0.2 and settings.pairs.strategy == "all"
    assert "sk-secret" not in repr(settings)
    judge = build_judge(settings)
    assert judge.judge_id.startswith("fn:concise*2+regex[")
    assert judge.rules.min_margin == 0.2


def test_bad_values_name_the_field(monkeypatch):
    monkeypatch.setenv("ONPOLICY_JUDGE_PAIRS__MIN_MARGIN", "-1")
    with pytest.raises(ConfigError, match="ONPOLICY_JUDGE_PAIRS__MIN_MARGIN"):
        load_settings(JudgeSettings)


def test_unknown_scorer_fails_at_build():
    with pytest.raises(ValueError, match="unknown scorer"):
        build_judge(JudgeSettings(functions=[{"name": "brevity"}]))


def test_reward_model_backend_needs_a_model():
    with pytest.raises(ValueError, match=r"reward_model\.model"):
        build_judge(JudgeSettings(backend="reward_model"))
