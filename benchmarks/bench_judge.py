"""Reward-model scoring throughput of the judge service through Kafka vs a plain loop.

Both sides score the same completions with the same reward model (the SmolLM2-135M backbone
with a seeded score head, saved as a sequence-classification model), the same batch size and
the same torch threads, in one process one after the other:

- baseline: a plain batched transformers loop (chat template, tokenizer padding, forward);
- service: the judge's processor consuming CompletionGroups from the real Kafka broker,
  scoring them in pooled token-budget batches and producing ScoredGroups and pairs (acked).

ratio = service seq/s / baseline seq/s; the goal is >= 0.95. The baseline runs before and
after the service (mean of both) because the CPU is shared with other work.
"""

from __future__ import annotations

import os
import random
import socket
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

BATCH = 16
GROUP_SIZE = 4
PROMPTS = [
    "How do I keep basil fresh?",
    "Explain what a hash map is.",
    "Give me a tip for learning to cook.",
    "Why is the sky blue?",
    "What should I pack for a day hike?",
    "How does compound interest work?",
]
SENTENCES = [
    "Keep it simple and practise every day.",
    "The main idea is that small steps add up over time.",
    "You can start with the basics and build from there.",
    "It depends on your goals, but consistency matters most.",
    "Many people find it easier with a clear plan.",
    "Remember to check the details before you begin.",
    "This is a common question with a short answer.",
]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def make_groups(n_groups: int, seed: int = 0) -> list[Any]:
    from onpolicy import messages as m

    rng = random.Random(seed)
    groups = []
    for g in range(n_groups):
        # The seed goes into the round so that warm-up groups never share the measured ids.
        prompt = m.Prompt(text=PROMPTS[g % len(PROMPTS)], round=seed * 100_000 + g)
        m.validate(prompt)
        completions = []
        for i in range(GROUP_SIZE):
            # 1-6 sentences, sometimes repeated: short SmolLM2-like answers (up to ~70 tokens).
            k = rng.randint(1, 6)
            text = " ".join(rng.choice(SENTENCES) for _ in range(k))
            finish = "length" if k == 6 else "stop"
            completions.append(m.Completion(index=i, text=text, finish_reason=finish))
        groups.append(
            m.validate(
                m.CompletionGroup(prompt_id=prompt.id, prompt=prompt, completions=completions)
            )
        )
    return groups


def build_reward_model(model_dir: Path, out: Path) -> Path:
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def baseline(rm_dir: Path, groups: list[Any]) -> tuple[float, list[float]]:
    """A plain batched transformers loop: seq/s and the scores."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from onpolicy_judge.chat import prompt_messages

    tokenizer = AutoTokenizer.from_pretrained(rm_dir)
    model = AutoModelForSequenceClassification.from_pretrained(rm_dir, dtype=torch.float32).eval()
    pairs = [(g.prompt, c.text) for g in groups for c in g.completions]

    def run(items: list[tuple[Any, str]]) -> list[float]:
        out: list[float] = []
        for start in range(0, len(items), BATCH):
            texts = [
                tokenizer.apply_chat_template(
                    [*prompt_messages(p), {"role": "assistant", "content": a}], tokenize=False
                )
                for p, a in items[start : start + BATCH]
            ]
            enc = tokenizer(texts, padding=True, add_special_tokens=False, return_tensors="pt")
            with torch.inference_mode():
                out.extend(model(**enc).logits[:, 0].float().tolist())
        return out

    run(pairs[:BATCH])  # warm-up
    started = time.perf_counter()
    scores = run(pairs)
    return len(pairs) / (time.perf_counter() - started), scores


def service(
    kafka: Any, rm_dir: Path, groups: list[Any], warmup: list[Any]
) -> tuple[float, dict[str, list[float]], float]:
    """The judge service through Kafka: seq/s from first produce to last output acked."""
    from onpolicy import messages as m
    from onpolicy.bus import Producer, ensure_topics, read_topic
    from onpolicy.settings import HttpSettings, TopicSettings
    from onpolicy.telemetry import Metrics, ServiceServer
    from onpolicy_judge.service import build
    from onpolicy_judge.settings import JudgeSettings

    topics = TopicSettings(prefix=f"bench-{uuid.uuid4().hex[:8]}.", partitions=2)
    ensure_topics(kafka, topics)
    settings = JudgeSettings(
        kafka=kafka,
        topics=topics,
        group_id=f"{topics.prefix}judge",
        backend="reward_model",
        concurrency=4 * BATCH // GROUP_SIZE,  # enough groups in flight to fill the batches
        reward_model={"model": str(rm_dir), "max_batch_size": BATCH, "batch_tokens": 1 << 20},
        grpc={"enabled": False},
    )
    metrics = Metrics("judge")
    processor = build(settings, metrics, ServiceServer("judge", metrics, HttpSettings(port=0)))

    def done() -> float:
        value = metrics.registry.get_sample_value(
            "onpolicy_judge_records_produced_total", {"topic": topics.name("scored")}
        )
        return value or 0.0

    def wait(n: int, timeout: float = 600) -> None:
        deadline = time.monotonic() + timeout
        while done() < n:
            if time.monotonic() > deadline:
                raise TimeoutError(f"service scored {done()} of {n} groups")
            time.sleep(0.01)

    producer = Producer(kafka)
    thread = threading.Thread(target=processor.run, kwargs={"install_signal_handlers": False})
    thread.start()
    try:
        for g in warmup:  # joins the group and warms the model up
            producer.send_sync(topics.name("completions"), g)
        wait(len(warmup))
        started = time.perf_counter()
        for g in groups:
            producer.send(topics.name("completions"), g)
        producer.flush()
        wait(len(warmup) + len(groups))
        elapsed = time.perf_counter() - started
        batches = metrics.registry.get_sample_value("onpolicy_judge_batch_size_count") or 0
        pooled = metrics.registry.get_sample_value("onpolicy_judge_batch_size_sum") or 0
    finally:
        processor.stop()
        thread.join(60)
        producer.close()
    scored = {
        r.message.group.id: list(r.message.scores)
        for r in read_topic(kafka, topics.name("scored"), m.ScoredGroup)
    }
    return len(groups) * GROUP_SIZE / elapsed, scored, pooled / max(batches, 1)


def run(args: Any) -> dict:
    import torch

    from onpolicy.settings import KafkaSettings
    from onpolicy.stack import KafkaBroker, StackSettings, ensure_default_model

    quick = getattr(args, "quick", False)
    n_groups = 8 if quick else 24
    groups = make_groups(n_groups)
    warmup = make_groups(2, seed=1)

    with tempfile.TemporaryDirectory(prefix="bench-judge-") as tmp:
        stack = StackSettings(
            state_dir=Path(tmp) / "stack", kafka_port=free_port(), kafka_controller_port=free_port()
        )
        rm_dir = build_reward_model(ensure_default_model(stack), Path(tmp) / "rm")
        before, expected = baseline(rm_dir, groups)

        external = os.environ.get("ONPOLICY_BENCH_BOOTSTRAP")
        broker = None if external else KafkaBroker(stack)
        if broker:
            broker.start()
        try:
            kafka = KafkaSettings(bootstrap_servers=external or broker.bootstrap, linger_ms=1)
            svc_rate, scored, mean_batch = service(kafka, rm_dir, groups, warmup)
        finally:
            if broker:
                broker.stop()
        # The cores are shared: a baseline run on each side of the service run evens out
        # load that drifts during the benchmark (the quick run does without).
        after = before if quick else baseline(rm_dir, groups)[0]
        base_rate = (before + after) / 2

    if len(scored) != n_groups + len(warmup):
        raise RuntimeError(
            f"{len(scored)} scored groups on the topic, wanted {n_groups + len(warmup)}"
        )
    # Same inputs, same model: the service must give the plain loop's scores.
    got = [s for g in groups for s in scored[g.id]]
    worst = max(abs(a - b) for a, b in zip(got, expected, strict=True))
    if worst > 1e-3:
        raise RuntimeError(f"service scores differ from the plain loop's by up to {worst:.2g}")
    ratio = svc_rate / base_rate
    sequences = n_groups * GROUP_SIZE
    setup = (
        f"SmolLM2-135M + score head, fp32 CPU, {torch.get_num_threads()} torch threads, "
        f"{sequences} sequences ({n_groups} groups x {GROUP_SIZE}, answers up to ~70 tokens), "
        f"batch {BATCH}; service through the real Kafka broker"
    )
    return {
        "ratio": round(ratio, 3),
        "service_seq_per_s": round(svc_rate, 2),
        "baseline_seq_per_s": round(base_rate, 2),
        "baseline_runs_seq_per_s": [round(before, 2), round(after, 2)],
        "goal": ">= 0.95",
        "max_score_difference": worst,
        "service_mean_batch": round(mean_batch, 1),
        "sequences": sequences,
        "setup": setup,
        "summary": (
            f"judge (reward model): service {svc_rate:.1f} seq/s through Kafka vs plain "
            f"transformers loop {base_rate:.1f} seq/s, ratio {ratio:.2f} (goal >= 0.95; {setup})"
        ),
    }
