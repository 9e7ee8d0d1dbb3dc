"""Pieces of the DPO round that need no training: prompt truncation and round metrics."""

from __future__ import annotations

import pytest

from onpolicy_trainer.dpo import _prompt_length, _round_metrics, truncate_prompt


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def test_long_prompt_is_cut_from_the_start_of_its_longest_turn(tokenizer):
    question = "Finally: what is the capital of France?"
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "blah " * 300 + question},
    ]
    assert _prompt_length(tokenizer, messages) > 64
    cut = truncate_prompt(tokenizer, messages, 64)
    assert _prompt_length(tokenizer, cut) <= 64
    assert cut[0] == messages[0]  # the short system turn is kept whole
    assert cut[1]["content"].endswith(question)  # the end of the prompt is what matters
    assert messages[1]["content"].startswith("blah")  # the input is not modified


def test_short_prompt_is_unchanged(tokenizer):
    messages = [{"role": "user", "content": "Hi!"}]
    assert truncate_prompt(tokenizer, messages, 64) == messages


def test_round_metrics_average_logged_steps_and_keep_the_last():
    history = [
        {"loss": 0.69, "rewards/margins": 0.0, "rewards/accuracies": 0.0},
        {"loss": 0.5, "rewards/margins": 1.0, "rewards/accuracies": 1.0},
        {"train_loss": 0.6, "train_runtime": 3.0},
    ]
    metrics = _round_metrics(history, train_loss=0.6)
    assert metrics["loss"] == 0.6 and metrics["steps"] == 2
    assert metrics["rewards/margins"] == 0.5 and metrics["last/rewards/margins"] == 1.0
    assert metrics["rewards/accuracies"] == 0.5
    assert "rewards/chosen" not in metrics  # absent from the log, absent from the result
