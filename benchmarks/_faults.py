"""Pieces of the fault matrix (``bench_faults``): the stubbed LLM judge, the in-process judge,
the poison records and the checks each cell is judged by."""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from onpolicy import messages as m
from onpolicy.bus import read_topic
from onpolicy.run.accounting import audit, trained_rows
from onpolicy.settings import KafkaSettings, TopicSettings

# ---------------------------------------------------------------- poison input
# Each poison record as a plain Kafka client would publish it: bytes, no key, no headers.
CONTEXT_TOKENS = 2048  # the stack's vLLM --max-model-len


def _chat(content: str, **extra: Any) -> bytes:
    return json.dumps({"messages": [{"role": "user", "content": content}], **extra}).encode()


POISON: dict[str, bytes] = {
    "undecodable": b"\xff\xfe\x00\x80 not utf-8, not JSON \xc3\x28",
    "wrong_shape": b'{"prompt": {"nested": [1, 2]}, "numSamples": "many"}',
    "empty_prompt": _chat("   "),
    # ~3 tokens a repetition: far beyond the context, so vLLM refuses it (400).
    "too_long": _chat("Summarise this: " + "lorem ipsum dolor " * CONTEXT_TOKENS),
    # 2 MiB: twice Kafka's default record limit (this stack allows 8 MiB).
    "oversized": _chat("Answer briefly: " + "x" * (2 * 1024 * 1024)),
    # A pattern RE2 cannot run (a backreference): the judge dead-letters its group.
    "regex_backreference": _chat("Say a word twice.", referenceAnswer=r"(\w+) \1"),
}
# Catastrophic for a backtracking engine (nested quantifiers, no match at the end): Python's
# re takes exponential time on an ordinary sentence; RE2 matches in linear time, so this one is
# no poison and must be judged like any other prompt.
CATASTROPHIC = r"^(\w+\s?)*$"


# ---------------------------------------------------------------- the stubbed LLM judge
class StormEndpoint:
    """An OpenAI-compatible chat endpoint at httpx's transport: answers ``status`` (with
    ``Retry-After`` for 429) for the first ``storm_s`` seconds after its first request, then
    rates each shown response (shorter answers higher, 1-5). ``delay_s``: each good answer
    takes this long (a slow backend)."""

    def __init__(self, status: int | None, storm_s: float = 0.0, delay_s: float = 0.0):
        self.status = status
        self.storm_s = storm_s
        self.delay_s = delay_s
        self.first: float | None = None
        self.counts: dict[int, int] = {}
        self.lock = threading.Lock()

    def _count(self, status: int) -> None:
        with self.lock:
            self.counts[status] = self.counts.get(status, 0) + 1

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        # Async: httpx's MockTransport awaits it, so a slow answer blocks no event loop.
        now = time.monotonic()
        with self.lock:
            self.first = self.first or now
            storming = self.status is not None and now - self.first < self.storm_s
        if storming:
            self._count(self.status)
            headers = {"Retry-After": "1"} if self.status == 429 else {}
            return httpx.Response(
                self.status, headers=headers, json={"error": {"message": "storm"}}
            )
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        prompt = json.loads(request.content)["messages"][0]["content"]
        parts = re.split(r"## Response \d+", prompt)[1:]
        order = sorted(range(len(parts)), key=lambda k: (len(parts[k]), k))
        ratings = [
            {"response": k + 1, "rationale": "shorter", "score": max(1, 5 - order.index(k))}
            for k in range(len(parts))
        ]
        self._count(200)
        body = {"choices": [{"message": {"content": json.dumps({"ratings": ratings})}}]}
        return httpx.Response(200, json=body)


class InProcessJudge:
    """The real judge service (processor, LLM backend, breaker) in this process, its LLM
    endpoint stubbed at the httpx transport (the only remote API of the loop)."""

    def __init__(self, kafka: KafkaSettings, topics: TopicSettings, endpoint: StormEndpoint):
        from onpolicy.settings import HttpSettings
        from onpolicy.telemetry import Metrics, ServiceServer
        from onpolicy_judge.judge import Judge
        from onpolicy_judge.llm import LlmBackend
        from onpolicy_judge.metrics import JudgeMetrics
        from onpolicy_judge.service import build
        from onpolicy_judge.settings import JudgeSettings

        settings = JudgeSettings(
            kafka=kafka,
            topics=topics,
            group_id=f"{topics.prefix}judge",
            grpc={"enabled": False},
            backend="llm",
            llm={"base_url": "https://judge.example/v1", "api_key": "sk-fault-matrix"},
            breaker_reset_s=1.0,
            breaker_max_reset_s=4.0,
        )
        self.metrics = Metrics("judge")
        judge_metrics = JudgeMetrics(self.metrics)
        backend = LlmBackend(settings.llm, judge_metrics, transport=httpx.MockTransport(endpoint))
        judge = Judge(backend, settings.pairs, judge_metrics)
        server = ServiceServer("judge", self.metrics, HttpSettings(host="127.0.0.1", port=0))
        self.processor = build(settings, self.metrics, server, judge=judge)  # server not started
        self.thread = threading.Thread(
            target=self.processor.run, kwargs={"install_signal_handlers": False}, daemon=True
        )

    def start(self) -> None:
        self.thread.start()

    def sample(self, name: str, **labels: str) -> float:
        value = self.metrics.registry.get_sample_value(f"onpolicy_judge_{name}", labels)
        return value or 0.0

    def stop(self) -> None:
        self.processor.stop()
        self.thread.join(60)


# ---------------------------------------------------------------- the checks
@dataclass
class Verdict:
    checks: dict[str, bool] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def check(self, name: str, ok: bool, note: str) -> None:
        self.checks[name] = bool(ok)
        self.notes.append(("ok " if ok else "FAIL ") + f"{name}: {note}")

    @property
    def passed(self) -> bool:
        return all(self.checks.values())


def dead_positions(
    kafka: KafkaSettings, topics: TopicSettings
) -> dict[tuple[int, int], m.DeadLetter]:
    """Each dead letter by the prompt-topic position it stands for: a prompt dead-lettered by
    the sampler, or the prompt of a group dead-lettered by the judge."""
    out = {}
    for record in read_topic(kafka, topics.name("dlq"), m.DeadLetter):
        letter = record.message
        if letter.source_topic == topics.name("prompts"):
            out[(letter.partition, letter.offset)] = letter
        elif letter.source_topic == topics.name("completions"):
            group = m.CompletionGroup.FromString(letter.original_value)
            out[(group.source.partition, group.source.offset)] = letter
        else:
            out[(-1, letter.offset)] = letter  # anything else is unexpected: it fails the cell
    return out


def judge_cell(
    kafka: KafkaSettings,
    topics: TopicSettings,
    checkpoints: Path,
    *,
    rounds: int,
    completed: bool,
    error: str | None,
    poison: dict[tuple[int, int], str],
) -> tuple[Verdict, dict[str, Any]]:
    v = Verdict()
    v.check("completed", completed, error or f"{rounds} policies published")
    versions = [r.message.version for r in read_topic(kafka, topics.name("policy"), m.PolicyUpdate)]
    v.check(
        "versions",
        versions[:rounds] == list(range(1, rounds + 1)) and len(versions) == len(set(versions)),
        f"policy topic {versions}",
    )
    rows = trained_rows(checkpoints)
    ids = [r["pair_id"] for rs in rows.values() for r in rs]
    on_policy = all({r["policy_version"] for r in rs} == {ver - 1} for ver, rs in rows.items())
    v.check(
        "no_pair_twice",
        len(ids) == len(set(ids)) and on_policy,
        f"{len(ids)} pairs trained in rounds {sorted(rows)} ({len(ids) - len(set(ids))} "
        f"repeated), each round sampled by the policy it improves: {on_policy}",
    )
    result = audit(kafka, topics, checkpoints)
    v.check("no_prompt_lost", not result.lost, f"fates {dict(result.fates)}, lost {result.lost}")
    dead = dead_positions(kafka, topics)
    reasons = {f"{p}@{o}": f"{d.error_kind}: {d.error_message[:160]}" for (p, o), d in dead.items()}
    exact = set(dead) == set(poison) and all(d.error_message for d in dead.values())
    v.check(
        "dead_letters",
        exact,
        f"expected {sorted(f'{p}@{o} ({k})' for (p, o), k in poison.items())}, got {reasons}",
    )
    return v, {"audit": result.as_dict(), "dead_letters": reasons, "versions": versions}
