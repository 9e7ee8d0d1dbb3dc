"""The judge service's fault handling through the real Kafka broker.

The LLM judge's endpoint is stubbed at httpx's transport level (httpx.MockTransport): the
backend, the processor, the breaker and the readiness check are the real ones.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time

import httpx
from _util import committed, running, sample_value, wait_records, wait_until

from onpolicy import messages as m
from onpolicy.bus import Producer, read_topic
from onpolicy.settings import HttpSettings
from onpolicy.telemetry import Metrics, ServiceServer
from onpolicy_judge.judge import Judge
from onpolicy_judge.llm import LlmBackend
from onpolicy_judge.metrics import JudgeMetrics
from onpolicy_judge.service import build
from onpolicy_judge.settings import JudgeSettings


def group(pid: str, text: str = "an answer") -> m.CompletionGroup:
    return m.CompletionGroup(
        prompt_id=pid,
        prompt=m.Prompt(id=pid, text="Name a colour.", dataset_split="train"),
        completions=[
            m.Completion(index=0, text=f"{text} zero", finish_reason="stop"),
            m.Completion(index=1, text=f"{text} one", finish_reason="stop"),
        ],
    )


class Endpoint:
    """An OpenAI-compatible chat endpoint: ``status`` for every request, or, at 200, a
    rating per shown response (the first shown scores 1, the next 2, ...)."""

    def __init__(self, status: int = 200, poison: str | None = None):
        self.status = status
        self.poison = poison  # requests whose prompt holds this get HTTP 500
        self.requests: list[float] = []
        self.lock = threading.Lock()

    def __call__(self, request: httpx.Request) -> httpx.Response:
        with self.lock:
            self.requests.append(time.monotonic())
        prompt = json.loads(request.content)["messages"][0]["content"]
        if self.poison and self.poison in prompt:
            return httpx.Response(500, json={"error": {"message": "internal error"}})
        if self.status != 200:
            return httpx.Response(
                self.status, json={"error": {"message": "Incorrect API key provided"}}
            )
        n = len(re.findall(r"## Response \d+", prompt))
        ratings = [{"response": k + 1, "rationale": "ok", "score": k + 1} for k in range(n)]
        return httpx.Response(
            200, json={"choices": [{"message": {"content": json.dumps({"ratings": ratings})}}]}
        )

    def count(self) -> int:
        with self.lock:
            return len(self.requests)


def service(kafka, topics, endpoint: Endpoint, **overrides):
    settings = JudgeSettings(
        kafka=kafka,
        topics=topics,
        group_id=f"{topics.prefix}judge",
        grpc={"enabled": False},
        backend="llm",
        llm={"base_url": "https://judge.example/v1", "api_key": "sk-x", "max_retries": 0},
        retry_backoff_s=0.05,
        max_backoff_s=0.2,
        breaker_reset_s=0.5,
        breaker_max_reset_s=1.0,
        **overrides,
    )
    metrics = Metrics("judge")
    judge_metrics = JudgeMetrics(metrics)
    backend = LlmBackend(settings.llm, judge_metrics, transport=httpx.MockTransport(endpoint))
    judge = Judge(backend, settings.pairs, judge_metrics)
    server = ServiceServer("judge", metrics, HttpSettings(host="127.0.0.1", port=0))
    processor = build(settings, metrics, server, judge=judge)
    server.add_check("kafka", lambda: processor.kafka_connected)  # as service_main does
    return settings, metrics, server, processor


def readyz(server: ServiceServer) -> httpx.Response:
    return httpx.get(f"http://127.0.0.1:{server.port}/readyz", timeout=5)


def test_a_rejected_api_key_pauses_without_dead_letters_or_commits_then_resumes(
    kafka, topics, caplog
):
    caplog.set_level(logging.INFO)
    endpoint = Endpoint(status=401)
    settings, metrics, server, processor = service(kafka, topics, endpoint)
    source = topics.name("completions")
    producer = Producer(kafka)
    for i in range(4):
        producer.send_sync(source, group(f"p-{i}"))
    producer.close()
    server.start()
    try:
        with running(processor):
            wait_until(
                lambda: sample_value(metrics, "paused", topic=source, reason="config") == 1,
                what="paused for a configuration error",
            )
            wait_until(lambda: processor.kafka_connected, what="connected")
            answer = readyz(server)
            assert answer.status_code == 503
            assert answer.json()["checks"] == {"judge": False, "kafka": True}
            sent = endpoint.count()
            time.sleep(3.0)  # probes at 0.5 s, then 1 s apart: a few, not a hammering
            probes = endpoint.count() - sent
            assert 1 <= probes <= 5, probes
            assert processor.paused_reason == "config"
            assert sample_value(metrics, "circuit_state", topic=source) in (1, 2)
            assert list(read_topic(kafka, topics.name("dlq"), m.DeadLetter)) == []
            assert list(read_topic(kafka, topics.name("scored"), m.ScoredGroup)) == []
            assert sum(committed(kafka, settings.group_id, source).values()) == 0
            assert sample_value(metrics, "dead_letters_total", topic=source, kind="processing") == 0

            endpoint.status = 200  # the key was fixed: the next probe gets through
            scored = wait_records(kafka, topics.name("scored"), m.ScoredGroup, 4, timeout=30)
            wait_until(
                lambda: sum(committed(kafka, settings.group_id, source).values()) == 4,
                what="offsets committed",
            )
            wait_until(lambda: readyz(server).status_code == 200, what="ready again")
            assert sample_value(metrics, "paused", topic=source, reason="config") == 0
            assert sample_value(metrics, "circuit_state", topic=source) == 0
    finally:
        server.stop()
    assert sorted(r.message.group.prompt_id for r in scored) == [f"p-{i}" for i in range(4)]
    assert list(read_topic(kafka, topics.name("dlq"), m.DeadLetter)) == []
    assert sample_value(metrics, "circuit_opened_total", topic=source, reason="config") == 1
    said = caplog.text
    assert "configuration or authorization error" in said and "HTTP 401" in said
    assert "API key was rejected" in said and "sk-x" not in said
    assert "consumption resumes" in said


def test_a_poison_group_is_dead_lettered_after_the_bound_while_others_flow(kafka, topics):
    endpoint = Endpoint(poison="POISON")
    settings, metrics, _, processor = service(kafka, topics, endpoint, max_transient_attempts=3)
    source = topics.name("completions")
    producer = Producer(kafka)
    groups = [group(f"p-{i}") for i in range(8)]
    groups.insert(3, group("p-poison", text="POISON"))
    for g in groups:
        producer.send_sync(source, g)
    producer.close()
    with running(processor):
        scored = wait_records(kafka, topics.name("scored"), m.ScoredGroup, 8)
        [dead] = wait_records(kafka, topics.name("dlq"), m.DeadLetter, 1)
        wait_until(
            lambda: sum(committed(kafka, settings.group_id, source).values()) == 9,
            what="offsets committed",
        )
    assert sorted(r.message.group.prompt_id for r in scored) == [f"p-{i}" for i in range(8)]
    letter = dead.message
    assert letter.error_kind == "poison" and letter.attempts == 3
    assert "HTTP 500" in letter.error_message and "max_transient_attempts=3" in letter.error_message
    assert m.CompletionGroup.FromString(letter.original_value).prompt_id == "p-poison"
    assert sample_value(metrics, "poison_dead_lettered_total", topic=source) == 1
    assert sample_value(metrics, "dead_letters_total", topic=source, kind="poison") == 1
    assert sample_value(metrics, "circuit_state", topic=source) == 0


def test_a_backend_failing_every_request_opens_the_breaker_and_nothing_is_dead_lettered(
    kafka, topics
):
    endpoint = Endpoint(status=503)
    settings, metrics, _, processor = service(kafka, topics, endpoint, max_transient_attempts=3)
    source = topics.name("completions")
    producer = Producer(kafka)
    for i in range(8):
        producer.send_sync(source, group(f"p-{i}"))
    producer.close()
    with running(processor):
        wait_until(
            lambda: sample_value(metrics, "paused", topic=source, reason="circuit_open") == 1,
            what="circuit open",
        )
        sent = endpoint.count()
        time.sleep(2.5)
        assert endpoint.count() - sent <= 4  # probes only, while open
        assert not processor.backend_ok
        assert list(read_topic(kafka, topics.name("dlq"), m.DeadLetter)) == []
        assert sum(committed(kafka, settings.group_id, source).values()) == 0
        endpoint.status = 200
        wait_records(kafka, topics.name("scored"), m.ScoredGroup, 8, timeout=30)
        wait_until(
            lambda: sum(committed(kafka, settings.group_id, source).values()) == 8,
            what="offsets committed",
        )
    assert list(read_topic(kafka, topics.name("dlq"), m.DeadLetter)) == []
    assert sample_value(metrics, "circuit_opened_total", topic=source, reason="circuit_open") == 1
    assert sample_value(metrics, "circuit_state", topic=source) == 0
