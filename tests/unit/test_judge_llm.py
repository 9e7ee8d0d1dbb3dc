"""LLM judge: parsing, order shuffling and HTTP failure handling.

The endpoint is stubbed only at httpx's transport level (httpx.MockTransport); the real
vLLM server is exercised in tests/integration/test_judge_llm_vllm.py.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re

import httpx
import pytest

from onpolicy import messages as m
from onpolicy.bus import ConfigurationError, TransientError
from onpolicy_judge.llm import (
    JudgeApiError,
    JudgeParseError,
    JudgeRejected,
    JudgeUnavailable,
    LlmBackend,
    ParseFailure,
    parse_ratings,
    retry_after,
)
from onpolicy_judge.metrics import JudgeMetrics
from onpolicy_judge.settings import LlmJudgeSettings

TOKEN = "sk-test-0123456789-secret"


def chat(content: str) -> dict:
    return {"choices": [{"message": {"role": "assistant", "content": content}}]}


def group(n: int = 3) -> m.CompletionGroup:
    return m.CompletionGroup(
        id="g-1",
        prompt_id="p",
        prompt=m.Prompt(id="p", text="Name a colour."),
        completions=[m.Completion(index=i, text=f"answer-{i}") for i in range(n)],
    )


class Recorder:
    """A fake sleep that records the delays asked for."""

    def __init__(self):
        self.delays: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.delays.append(seconds)


def backend(handler, **overrides) -> tuple[LlmBackend, Recorder, JudgeMetrics]:
    settings = LlmJudgeSettings(
        base_url="https://judge.example/v1", api_key=TOKEN, backoff_s=0.5, **overrides
    )
    sleep, metrics = Recorder(), JudgeMetrics()
    return LlmBackend(settings, metrics, httpx.MockTransport(handler), sleep), sleep, metrics


def grade_by_text(request: httpx.Request) -> httpx.Response:
    """A judge that reads the shown order and scores answer-i with i+1, with rationales."""
    prompt = json.loads(request.content)["messages"][0]["content"]
    shown = [int(i) for i in re.findall(r"## Response \d+\nanswer-(\d+)", prompt)]
    ratings = [
        {"response": k + 1, "rationale": f"r{i}", "score": i + 1} for k, i in enumerate(shown)
    ]
    return httpx.Response(
        200, json=chat("Sure!\n```json\n" + json.dumps({"ratings": ratings}) + "\n```")
    )


def test_shuffled_order_is_mapped_back():
    orders = []

    def handler(request):
        prompt = json.loads(request.content)["messages"][0]["content"]
        orders.append(re.findall(r"answer-(\d+)", prompt))
        return grade_by_text(request)

    b, _, _ = backend(handler)
    g = group(4)
    result = asyncio.run(b.score(g))
    assert result.scores == [1.0, 2.0, 3.0, 4.0]
    assert result.rationales == ["r0", "r1", "r2", "r3"]
    asyncio.run(b.score(g))
    # Shown shuffled, the same way for the same group (a replay asks the same question).
    assert orders[0] != ["0", "1", "2", "3"] and orders[0] == orders[1]
    assert sorted(orders[0]) == ["0", "1", "2", "3"]


def test_request_carries_token_and_nothing_logs_it(caplog, tmp_path):
    seen = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers["authorization"])
        if len(seen) == 1:
            return httpx.Response(503, text=f"overloaded (your key {TOKEN})")
        return grade_by_text(request)

    caplog.set_level(logging.DEBUG)
    b, _, _ = backend(handler)
    asyncio.run(b.score(group()))
    assert seen == [f"Bearer {TOKEN}"] * 2
    assert TOKEN not in caplog.text
    assert TOKEN not in repr(b.settings)
    # A secret file is read when no token is set directly.
    secret = tmp_path / "token"
    secret.write_text(TOKEN + "\n")
    from_file = LlmBackend(LlmJudgeSettings(api_key_file=secret), JudgeMetrics())
    assert from_file._token == TOKEN


def test_429_honours_retry_after_then_succeeds():
    calls = []

    def handler(request):
        calls.append(1)
        if len(calls) <= 2:
            return httpx.Response(429, headers={"Retry-After": "7"}, text="slow down")
        return grade_by_text(request)

    b, sleep, metrics = backend(handler)
    assert asyncio.run(b.score(group())).scores == [1.0, 2.0, 3.0]
    assert sleep.delays == [7.0, 7.0]
    assert (
        metrics.metrics.registry.get_sample_value(
            "onpolicy_judge_api_errors_total", {"status": "429"}
        )
        == 2
    )


def test_5xx_backs_off_exponentially_then_raises_with_status():
    b, sleep, metrics = backend(lambda r: httpx.Response(502, text="bad gateway"), max_retries=3)
    with pytest.raises(JudgeApiError, match="HTTP 502") as info:
        asyncio.run(b.score(group()))
    assert info.value.status == 502
    assert len(sleep.delays) == 3
    # Jittered exponential: each delay within [0.5, 1] x 0.5 * 2^k.
    for k, delay in enumerate(sleep.delays):
        assert 0.25 * 2**k <= delay <= 0.5 * 2**k
    assert (
        metrics.metrics.registry.get_sample_value(
            "onpolicy_judge_api_errors_total", {"status": "502"}
        )
        == 4
    )


def test_4xx_is_not_retried():
    b, sleep, _ = backend(lambda r: httpx.Response(400, text="prompt too long"))
    with pytest.raises(JudgeApiError, match="400") as info:
        asyncio.run(b.score(group()))
    assert sleep.delays == []
    # This group's request was bad: neither the backend's fault nor a configuration error.
    assert not isinstance(info.value, TransientError | ConfigurationError)


def test_5xx_after_every_retry_looks_transient():
    b, _, _ = backend(lambda r: httpx.Response(500, text="internal error"), max_retries=1)
    with pytest.raises(JudgeUnavailable, match="HTTP 500") as info:
        asyncio.run(b.score(group()))
    assert isinstance(info.value, TransientError)
    assert not isinstance(info.value, ConfigurationError)


@pytest.mark.parametrize(
    ("status", "says"),
    [
        (401, "API key was rejected"),
        (403, "may not use this model"),
        (404, "no such model or endpoint (llm.model 'judge-x'"),
    ],
)
def test_401_403_404_are_configuration_errors_not_retried(status, says):
    body = {"error": {"message": f"denied for {TOKEN}", "code": status}}
    b, sleep, metrics = backend(lambda r: httpx.Response(status, json=body), model="judge-x")
    with pytest.raises(JudgeRejected, match=re.escape(says)) as info:
        asyncio.run(b.score(group()))
    assert isinstance(info.value, ConfigurationError) and info.value.status == status
    assert not isinstance(info.value, TransientError)
    assert TOKEN not in str(info.value) and "denied for ***" in str(info.value)
    assert sleep.delays == []  # every request would fail alike: no point retrying here
    assert (
        metrics.metrics.registry.get_sample_value(
            "onpolicy_judge_api_errors_total", {"status": str(status)}
        )
        == 1
    )


def test_a_rotated_key_file_is_read_again_after_a_401(tmp_path):
    secret = tmp_path / "token"
    secret.write_text("old-key\n")
    seen = []

    def handler(request):
        seen.append(request.headers.get("authorization"))
        if request.headers.get("authorization") == "Bearer old-key":
            return httpx.Response(401, json={"error": "expired"})
        return grade_by_text(request)

    settings = LlmJudgeSettings(base_url="https://judge.example/v1", api_key_file=secret)
    b = LlmBackend(settings, JudgeMetrics(), httpx.MockTransport(handler), Recorder())

    async def twice():
        with pytest.raises(JudgeRejected):
            await b.score(group())
        secret.write_text("new-key\n")  # the mounted Secret was updated
        return await b.score(group())

    assert asyncio.run(twice()).scores == [1.0, 2.0, 3.0]
    assert seen == ["Bearer old-key", "Bearer new-key"]


def test_unreachable_endpoint_is_transient():
    def handler(request):
        raise httpx.ConnectError("connection refused", request=request)

    b, sleep, metrics = backend(handler, max_retries=2)
    with pytest.raises(TransientError):
        asyncio.run(b.score(group()))
    assert len(sleep.delays) == 2
    assert (
        metrics.metrics.registry.get_sample_value(
            "onpolicy_judge_api_errors_total", {"status": "network"}
        )
        == 3
    )


def test_timeouts_fail_the_attempt_instead_of_waiting_forever():
    def handler(request):
        raise httpx.ReadTimeout("judge too slow", request=request)

    b, sleep, _ = backend(handler, max_retries=1)
    with pytest.raises(JudgeApiError, match="ReadTimeout"):
        asyncio.run(b.score(group()))
    assert len(sleep.delays) == 1


def test_malformed_answers_are_retried_then_dead_lettered():
    answers = iter(["I think they are all fine.", '{"ratings": [{"score": 4}]}', "{broken"])
    b, _, metrics = backend(
        lambda r: httpx.Response(200, json=chat(next(answers))), parse_retries=2
    )
    with pytest.raises(JudgeParseError, match="3 tries") as info:
        asyncio.run(b.score(group()))
    assert info.value.kind == "parse"
    reg = metrics.metrics.registry
    for reason in ("no_json", "count"):
        assert reg.get_sample_value("onpolicy_judge_parse_failures_total", {"reason": reason}) >= 1


def test_a_later_try_that_parses_is_used():
    answers = iter(["no idea", '[{"score": "5"}, {"score": 2}, {"score": 3.5}]'])
    b, _, _ = backend(lambda r: httpx.Response(200, json=chat(next(answers))), shuffle=False)
    assert asyncio.run(b.score(group())).scores == [5.0, 2.0, 3.5]


def test_json_mode_sends_a_schema():
    bodies = []

    def handler(request):
        bodies.append(json.loads(request.content))
        return grade_by_text(request)

    b, _, _ = backend(handler, json_mode=True)
    asyncio.run(b.score(group(2)))
    schema = bodies[0]["response_format"]["json_schema"]["schema"]
    assert schema["properties"]["ratings"]["minItems"] == 2


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('{"ratings": [{"response": 2, "score": 1}, {"response": 1, "score": 5}]}', [5, 1]),
        ('{"1": {"score": 3, "rationale": "ok"}, "2": {"score": 4}}', [3, 4]),
        ('{"Response 1": 2, "Response 2": "4/5"}', [2, 4]),
        ("Here: [4, 5] done", [4, 5]),
        ('{"scores": [{"index": 1, "rating": 2}, {"index": 2, "rating": 3}]}', [2, 3]),
    ],
)
def test_parser_accepts_common_shapes(text, expected):
    assert [r.score for r in parse_ratings(text, 2)] == expected


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("no json here", "no_json"),
        ('{"ratings": [{"score": 4}]}', "count"),
        ('[{"score": 9}, {"score": 1}]', "out_of_range"),
        ('[{"rationale": "x"}, {"score": 1}]', "missing_score"),
        ('{"ratings": [{"response": 1, "score": 4}, {"response": 1, "score": 3}]}', "index"),
        ('"just a string"', "no_json"),
    ],
)
def test_parser_rejects_with_a_reason(text, reason):
    with pytest.raises(ParseFailure) as info:
        parse_ratings(text, 2)
    assert info.value.reason == reason


def test_retry_after_accepts_seconds_and_dates():
    assert retry_after(httpx.Response(429, headers={"Retry-After": "3"})) == 3.0
    assert (
        retry_after(httpx.Response(429, headers={"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"}))
        == 0.0
    )
    assert retry_after(httpx.Response(429)) is None


def test_bad_template_fails_at_start():
    with pytest.raises(ValueError, match="template"):
        LlmBackend(LlmJudgeSettings(template="{nope}"), JudgeMetrics())
