"""The round protocol kept by the services themselves: how much sampled work is thrown away.

The services are started on their own (two sampler replicas, two judge replicas, one trainer;
``onpolicy.run.deployment``), as compose or Kubernetes starts them, on a local broker and vLLM.
Many more prompts than three rounds need are published at once by a plain Kafka client, as
JSON lines. The same run is made twice, side by side in one benchmark: with the round protocol
(the default) and without it (each sampler takes every prompt as it comes, the trainer trains
every ``round_size`` pairs and drops older ones as stale: the first wave's behaviour).

Written to ``benchmarks/results/protocol.json``: ``published_prompts``, ``sampled_groups``,
``trained_pairs``, ``stale_dropped``, ``lost_prompts`` and ``stale_fraction`` (stale_dropped
/ sampled training groups) of the protocol run, and the same figures without it.
"""

from __future__ import annotations

import tempfile
import time
import uuid
from importlib import resources
from pathlib import Path
from typing import Any

from kafka import KafkaProducer

from onpolicy import messages as m
from onpolicy.bus import ensure_topics, read_topic
from onpolicy.run.accounting import audit
from onpolicy.run.deployment import Deployment
from onpolicy.settings import KafkaSettings, TopicSettings, load_settings
from onpolicy.stack import KafkaBroker, StackSettings, VllmServer, ensure_default_model

ROUNDS, ROUND_SIZE = 3, 8
IDLE_S = 240.0


def one_run(
    kafka: KafkaSettings, vllm_url: str, model: Path, folder: Path, protocol: bool, n: int
) -> dict[str, Any]:
    topics = TopicSettings(prefix=f"bench-{uuid.uuid4().hex[:6]}.", partitions=2)
    ensure_topics(kafka, topics)
    deployment = Deployment(
        kafka=kafka,
        topics=topics,
        folder=folder,
        sampler={
            "vllm_url": vllm_url,
            "num_samples": 4,
            "max_tokens": 64,
            "concurrency": 16,
            "round_protocol": protocol,
            "adapter_prefix": f"{topics.prefix.strip('.')}-policy",
            "adapter_cache_dir": str(folder / "adapters"),
            "adapter_uri_prefixes": [str(folder / "checkpoints")],
        },
        judge={"backend": "function", "functions": [{"name": "concise"}]},
        trainer={
            "model": str(model),
            "checkpoint_uri": str(folder / "checkpoints"),
            "round_protocol": protocol,
            "round_size": ROUND_SIZE,
            "round_timeout_s": 120.0,
            "max_length": 256,
            "learning_rate": 1e-3,
            "per_device_batch_size": 2,
        },
    )
    lines = (resources.files("onpolicy.data") / "demo_prompts.jsonl").read_text().splitlines()
    started = time.monotonic()
    try:
        deployment.start()
        producer = KafkaProducer(bootstrap_servers=kafka.bootstrap_servers)
        for line in lines[:n]:
            producer.send(topics.name("prompts"), line.encode())
        producer.flush(30)
        producer.close()

        def versions() -> int:
            return len(list(read_topic(kafka, topics.name("policy"), m.PolicyUpdate)))

        def groups() -> int:
            return len(list(read_topic(kafka, topics.name("scored"), m.ScoredGroup)))

        last = {"versions": -1, "at": time.monotonic()}

        def done() -> bool:
            # Three policies; or (without the protocol) every prompt sampled and judged and
            # no new policy for IDLE_S: the stale pairs leave it no fresh pairs for a round.
            v = versions()
            if v != last["versions"]:
                last.update(versions=v, at=time.monotonic())
            if v >= ROUNDS:
                return True
            idle = time.monotonic() - last["at"] > IDLE_S
            return not protocol and idle and groups() >= n

        deployment.wait(done, 3600, f"{ROUNDS} policies")
        stale = deployment["trainer"].metric("onpolicy_trainer_pairs_dropped_total", reason="stale")
    finally:
        deployment.stop()
    wall = time.monotonic() - started
    result = audit(kafka, topics, folder / "checkpoints").as_dict()
    result |= {
        "stale_dropped": int(stale),
        "stale_fraction": round(stale / max(result["sampled_groups"], 1), 3),
        "wall_s": round(wall, 1),
    }
    return result


def run(args: Any) -> dict[str, Any]:
    n = 48 if args.quick else 96
    state = Path(tempfile.mkdtemp(prefix="bench-protocol-"))
    stack = load_settings(
        StackSettings,
        state_dir=state,
        kafka_port=19292,
        kafka_controller_port=19293,
        vllm_port=18111,
    )
    broker = KafkaBroker(stack)
    broker.start()
    model = ensure_default_model(stack)
    server = VllmServer(stack, model)
    server.start()
    kafka = KafkaSettings(bootstrap_servers=broker.bootstrap, linger_ms=0)
    try:
        on = one_run(kafka, server.url, model, state / "protocol", True, n)
        off = one_run(kafka, server.url, model, state / "no-protocol", False, n)
    finally:
        server.stop()
        broker.stop()
    summary = (
        f"**Round protocol** (`python -m benchmarks protocol`): services started on their own "
        f"(2 samplers, 2 judges, 1 trainer), {n} prompts published at once as JSON lines, "
        f"{ROUNDS} rounds of {ROUND_SIZE} pairs: {on['sampled_groups']} groups sampled, "
        f"{on['trained_pairs']} pairs trained, stale {on['stale_dropped']} "
        f"(fraction **{on['stale_fraction']:.3f}**, goal <= 0.05), lost prompts "
        f"**{on['lost_prompts']}** (goal 0). Without the protocol, same run: "
        f"{off['sampled_groups']} groups sampled, {off['trained_pairs']} trained, "
        f"{off['stale_dropped']} stale ({off['stale_fraction']:.3f}), {off['lost_prompts']} "
        "prompts lost."
    )
    return {
        **{
            k: on[k]
            for k in (
                "published_prompts",
                "sampled_groups",
                "trained_pairs",
                "stale_dropped",
                "lost_prompts",
                "stale_fraction",
            )
        },
        "goal": "lost_prompts 0 and stale_fraction <= 0.05",
        "protocol": on,
        "without_protocol": off,
        "setup": {
            "rounds": ROUNDS,
            "round_size": ROUND_SIZE,
            "samplers": 2,
            "judges": 2,
            "n": 4,
            "max_tokens": 64,
            "quick": bool(args.quick),
        },
        "summary": summary,
    }
