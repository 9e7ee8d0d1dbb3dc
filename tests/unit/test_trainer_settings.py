"""The trainer refuses at start what no sampler could serve."""

from __future__ import annotations

import pytest

from onpolicy.settings import ConfigError, load_settings
from onpolicy_trainer.settings import TrainerSettings


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for var in list(os.environ):
        if var.startswith("ONPOLICY_"):
            monkeypatch.delenv(var)


def test_lora_r_above_max_lora_rank_is_refused_naming_both() -> None:
    lora = {"model": "m", "handoff": "lora"}
    assert load_settings(TrainerSettings, **lora, lora_r=16).max_lora_rank == 16
    with pytest.raises(ConfigError) as err:
        load_settings(TrainerSettings, **lora, lora_r=32)
    message = str(err.value)
    assert "lora_r (32)" in message and "max_lora_rank (16)" in message
    assert "ONPOLICY_MAX_LORA_RANK" in message
    assert load_settings(TrainerSettings, **lora, lora_r=32, max_lora_rank=32).lora_r == 32
    # Merged weights carry no rank vLLM must serve: any lora_r is fine.
    assert load_settings(TrainerSettings, model="m", lora_r=32).handoff == "merged"


def test_the_shared_variable_sets_the_handoff_everywhere(monkeypatch: pytest.MonkeyPatch) -> None:
    from onpolicy.stack import StackSettings
    from onpolicy_sampler.settings import SamplerSettings

    for cls in (TrainerSettings, SamplerSettings, StackSettings):
        assert load_settings(cls, **({"model": "m"} if cls is TrainerSettings else {})).handoff == (
            "merged"
        )
    monkeypatch.setenv("ONPOLICY_HANDOFF", "lora")
    assert load_settings(TrainerSettings, model="m").handoff == "lora"
    assert load_settings(SamplerSettings).handoff == "lora"
    assert load_settings(StackSettings).handoff == "lora"
    monkeypatch.setenv("ONPOLICY_HANDOFF", "adapter")
    with pytest.raises(ConfigError) as err:
        load_settings(SamplerSettings)
    assert "handoff" in str(err.value)


def test_the_shared_variable_sets_max_lora_rank(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ONPOLICY_MAX_LORA_RANK", "64")
    monkeypatch.setenv("ONPOLICY_TRAINER_LORA_R", "64")
    settings = load_settings(TrainerSettings, model="m")
    assert (settings.lora_r, settings.max_lora_rank) == (64, 64)
    from onpolicy.stack import StackSettings
    from onpolicy_sampler.settings import SamplerSettings

    assert load_settings(SamplerSettings).max_lora_rank == 64
    assert load_settings(StackSettings).max_lora_rank == 64


def test_full_finetune_needs_a_full_weights_reload_path() -> None:
    # The merged hand-off reloads full weights: a full fine-tune closes the loop there.
    assert load_settings(TrainerSettings, model="m", full_finetune=True).full_finetune
    with pytest.raises(ConfigError) as err:
        load_settings(TrainerSettings, model="m", full_finetune=True, handoff="lora")
    message = str(err.value)
    assert "full_finetune" in message and "cannot hot-load" in message
    assert "ONPOLICY_TRAINER_FULL_WEIGHTS_RELOAD" in message
    settings = load_settings(
        TrainerSettings,
        model="m",
        full_finetune=True,
        full_weights_reload=True,
        lora_r=64,
        handoff="lora",
    )
    assert settings.full_finetune  # no LoRA rank limit without a LoRA
