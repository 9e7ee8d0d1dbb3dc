"""LLM judge against the real vLLM CPU server, with SmolLM2-135M acting as the judge.

A 135M model is a poor judge: it often answers with prose or broken JSON. That is the point
here: its real malformed outputs must be counted, retried and finally dead-lettered, and
constrained decoding (json_mode) must turn it into a usable judge.
"""

from __future__ import annotations

import asyncio

import pytest

from onpolicy import messages as m
from onpolicy_judge.llm import JudgeParseError, LlmBackend
from onpolicy_judge.metrics import JudgeMetrics
from onpolicy_judge.settings import LlmJudgeSettings

pytestmark = pytest.mark.vllm


def group() -> m.CompletionGroup:
    answers = [
        "The sky is blue because air scatters blue sunlight more than red light.",
        "Blue blue blue blue blue blue blue blue.",
        "Because of Rayleigh scattering.",
    ]
    return m.CompletionGroup(
        id="g-vllm",
        prompt_id="p-vllm",
        prompt=m.Prompt(id="p-vllm", text="Why is the sky blue? Answer in one sentence."),
        completions=[
            m.Completion(index=i, text=t, finish_reason="stop") for i, t in enumerate(answers)
        ],
    )


def parse_failures(metrics: JudgeMetrics) -> float:
    reg = metrics.metrics.registry
    return sum(
        s.value
        for fam in reg.collect()
        if fam.name == "onpolicy_judge_parse_failures"
        for s in fam.samples
        if s.name.endswith("_total")
    )


def settings(url: str, **kw) -> LlmJudgeSettings:
    return LlmJudgeSettings(base_url=f"{url}/v1", model="SmolLM2-135M-Instruct", **kw)


async def _score(backend: LlmBackend, g: m.CompletionGroup):
    try:
        return await backend.score(g)
    finally:
        await backend.aclose()


def test_json_mode_gives_parseable_scores(vllm_server):
    metrics = JudgeMetrics()
    backend = LlmBackend(settings(vllm_server, json_mode=True, max_tokens=300), metrics)
    result = asyncio.run(_score(backend, group()))
    assert len(result.scores) == 3 and len(result.rationales) == 3
    assert all(1 <= s <= 5 for s in result.scores)
    assert all(s == int(s) for s in result.scores)  # the schema asks for integers


def test_free_text_answers_are_retried_then_dead_lettered(vllm_server):
    metrics = JudgeMetrics()
    template = (
        "Write a four-line poem about these answers to '{instruction}':\n{responses}\n"
        "({n} answers.) Do not use numbers, lists or brackets."
    )
    backend = LlmBackend(
        settings(vllm_server, template=template, max_tokens=60, parse_retries=1), metrics
    )
    with pytest.raises(JudgeParseError) as info:
        asyncio.run(_score(backend, group()))
    assert info.value.kind == "parse"
    assert parse_failures(metrics) == 2  # the first answer and the one retry


def test_default_template_real_outputs_are_used_or_counted(vllm_server):
    """Without constrained decoding SmolLM2's answer may or may not parse; either way every
    request is accounted for: a parse failure, or the (last) answer that was used."""
    metrics = JudgeMetrics()
    backend = LlmBackend(settings(vllm_server, max_tokens=200, parse_retries=2), metrics)
    try:
        result = asyncio.run(_score(backend, group()))
    except JudgeParseError:
        assert parse_failures(metrics) == 3
    else:
        assert all(1 <= s <= 5 for s in result.scores)
        assert parse_failures(metrics) <= 2
