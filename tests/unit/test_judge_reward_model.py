"""Reward-model backend on a real sequence-classification model: the SmolLM2 backbone with a
score head (seeded), saved to a temporary folder like any Hugging Face reward model."""

from __future__ import annotations

import asyncio
import math

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from onpolicy import messages as m
from onpolicy_judge import JudgeSettings, build_judge
from onpolicy_judge.metrics import JudgeMetrics
from onpolicy_judge.reward_model import RewardModel, RewardModelBackend, plan_batch
from onpolicy_judge.settings import RewardModelSettings


@pytest.fixture(scope="module")
def reward_model_dir(model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("rm")
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def make_group(gid: str, answers: list[str]) -> m.CompletionGroup:
    return m.CompletionGroup(
        id=gid,
        prompt_id=f"p-{gid}",
        prompt=m.Prompt(id=f"p-{gid}", text="Give me a tip for learning to cook."),
        completions=[
            m.Completion(index=i, text=a, finish_reason="stop") for i, a in enumerate(answers)
        ],
    )


ANSWERS = [
    "Start with simple recipes.",
    "Cook often, taste as you go, and learn a few base techniques like sauteing and roasting.",
    "Cook. Cook. Cook. Cook. Cook. Cook. Cook. Cook.",
]


def test_plan_batch_respects_token_budget_and_size():
    assert plan_batch([10, 10, 10, 10], batch_tokens=30, max_batch_size=8) == 3
    assert plan_batch([10, 40, 10], batch_tokens=60, max_batch_size=8) == 1
    assert plan_batch([100], batch_tokens=30, max_batch_size=8) == 1  # always progress
    assert plan_batch([5] * 10, batch_tokens=1000, max_batch_size=4) == 4
    assert plan_batch([5, 5], batch_tokens=1000, max_batch_size=4) == 2


def test_scores_with_the_chat_template_and_batching_does_not_change_them(reward_model_dir):
    settings = RewardModelSettings(model=str(reward_model_dir), batch_wait_ms=20)
    metrics = JudgeMetrics()
    backend = RewardModelBackend(settings, metrics)
    assert backend.model.dtype == torch.float32 and backend.model.device.type == "cpu"
    text = backend.model.format(make_group("a", ANSWERS).prompt, "Hello")
    assert "<|im_start|>assistant\nHello" in text

    groups = [make_group(g, ANSWERS) for g in ("a", "b", "c")]

    async def together():
        return await asyncio.gather(*(backend.score(g) for g in groups))

    pooled = asyncio.run(together())
    singles = [backend.model.forward([seq])[0] for seq in backend.model.encode(groups[0])]
    for result in pooled:
        assert all(math.isfinite(s) for s in result.scores)
        assert result.scores == pytest.approx(singles, abs=1e-4)
    assert len(set(round(s, 4) for s in singles)) == 3  # the head tells the answers apart
    # The three groups shared forward passes (pooled), not one pass per group.
    reg = metrics.metrics.registry
    passes = reg.get_sample_value("onpolicy_judge_batch_size_count")
    assert reg.get_sample_value("onpolicy_judge_batch_size_sum") == 9
    assert passes < 3


def test_truncation_is_counted_and_keeps_the_end(reward_model_dir):
    metrics = JudgeMetrics()
    model = RewardModel(RewardModelSettings(model=str(reward_model_dir), max_length=100), metrics)
    long_answer = "word " * 200
    encoded = model.encode(make_group("t", [long_answer, "short"]))
    assert len(encoded[0]) == 100 and len(encoded[1]) < 100
    assert model.truncated == 1
    assert metrics.metrics.registry.get_sample_value("onpolicy_judge_truncated_total") == 1
    assert model.tokenizer.decode(encoded[0]).endswith("<|im_end|>\n")


def test_build_judge_with_reward_model_backend(reward_model_dir):
    settings = JudgeSettings(backend="reward_model", reward_model={"model": str(reward_model_dir)})
    judge = build_judge(settings)
    scored, pairs = asyncio.run(judge.evaluate(make_group("x", ANSWERS)))
    assert judge.judge_id == f"rm:{reward_model_dir.name}"
    assert len(scored.scores) == 3
    best = max(range(3), key=lambda i: scored.scores[i])
    worst = min(range(3), key=lambda i: scored.scores[i])
    assert [(p.chosen_index, p.rejected_index) for p in pairs] == [(best, worst)]
