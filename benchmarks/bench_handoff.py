"""The policy hand-off: sampling speed of a trained policy in each mode, and the hand-off time.

Two vLLM servers run side by side, each as the stack starts it: ``lora`` (``--enable-lora``,
runtime adapters) and ``merged`` (no LoRA, dev mode: weights reloaded in place). One policy is
trained for real (TRL DPO on synthetic pairs, the trainer's ``train_round``) and merged by the
trainer's merge module. Then:

- ``handoff_s``: a real sampler service per server (Kafka, the policy tracker) gets the
  PolicyUpdate; probe prompts are published every 0.25 s; the time from publishing the
  update to the start of the first request whose group is stamped with the new version;
- tok/s: the same 32 chat requests (n=4, 64 tokens, ``ignore_eos``: every pass samples the
  same 8,192 tokens), 32 in flight, with the base model and with the policy on each server,
  alternating passes (lora base, merged base, lora policy, merged policy) twice. On the merged
  server "base" means the base weights reloaded (not timed).

``ratio`` = the default mode's (merged) policy tok/s / the best base tok/s of either server.
"""

from __future__ import annotations

import asyncio
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import httpx

from onpolicy import messages as m
from onpolicy.bus import Producer, ensure_topics, read_topic
from onpolicy.settings import KafkaSettings, TopicSettings, load_settings
from onpolicy.stack import KafkaBroker, StackSettings, VllmServer, ensure_default_model
from onpolicy.telemetry import Metrics

REQUESTS, N, TOKENS = 32, 4, 64
QUESTIONS = [
    "Explain why the sky is blue.",
    "Describe how a bicycle works.",
    "What makes a good breakfast?",
    "Tell me about the history of tea.",
]


def train_policy(model: Path, folder: Path) -> tuple[Path, Path]:
    from transformers import AutoTokenizer

    from onpolicy_trainer.dpo import train_round
    from onpolicy_trainer.merge import merge_adapter
    from onpolicy_trainer.pairs import to_rows
    from onpolicy_trainer.settings import TrainerSettings
    from onpolicy_trainer.synthetic import make_pairs

    settings = TrainerSettings(
        model=str(model),
        round_protocol=False,
        max_length=160,
        per_device_batch_size=2,
        learning_rate=1e-3,
    )
    rows = to_rows(make_pairs(8, tokenizer=AutoTokenizer.from_pretrained(str(model))))
    result = train_round(settings, rows, None, folder / "policy-v1")
    merged = merge_adapter(str(model), result.output_dir, folder / "merged-v1")
    return result.output_dir, merged


async def _load(url: str, model: str, requests: int = REQUESTS) -> tuple[int, float]:
    """``requests`` chat requests, all in flight at once: completion tokens and seconds."""
    async with httpx.AsyncClient(base_url=url, timeout=600) as http:

        async def one(i: int) -> int:
            body = {
                "model": model,
                "messages": [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}],
                "n": N,
                "max_tokens": TOKENS,
                "temperature": 1.0,
                "ignore_eos": True,
            }
            response = await http.post("/v1/chat/completions", json=body)
            response.raise_for_status()
            return response.json()["usage"]["completion_tokens"]

        started = time.monotonic()
        tokens = await asyncio.gather(*(one(i) for i in range(requests)))
        return sum(tokens), time.monotonic() - started


def tok_s(url: str, model: str) -> float:
    tokens, seconds = asyncio.run(_load(url, model))
    return round(tokens / seconds, 1)


def handoff(kafka: KafkaSettings, url: str, mode: str, adapter: Path, merged: Path, tmp: Path):
    """Publish v1 to a running sampler; seconds until a request stamped v1 started."""
    from onpolicy_sampler.app import SamplerService
    from onpolicy_sampler.settings import SamplerSettings

    topics = TopicSettings(prefix=f"bench-{uuid.uuid4().hex[:6]}.", partitions=1)
    ensure_topics(kafka, topics)
    settings = load_settings(
        SamplerSettings,
        kafka=kafka,
        topics=topics,
        vllm_url=url,
        handoff=mode,
        num_samples=1,
        max_tokens=8,
        round_protocol=False,
        group_id=f"{topics.prefix}sampler",
        adapter_cache_dir=tmp / f"cache-{mode}",
    )
    service = SamplerService(settings, Metrics(f"bench_{mode}"))
    thread = threading.Thread(
        target=service.run, kwargs={"install_signal_handlers": False}, daemon=True
    )
    thread.start()
    producer = Producer(kafka)
    try:
        service.tracker.caught_up.wait(300)
        update = m.validate(
            m.PolicyUpdate(
                version=1,
                adapter_uri=str(adapter),
                checkpoint_uri=str(merged),
                created_unix_ms=int(time.time() * 1000),
            )
        )
        probe = m.SamplingParams(temperature=0.0, max_tokens=8)
        published = time.time()
        producer.send_sync(topics.name("policy"), update)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            prompt = m.Prompt(text=f"Say hi. {uuid.uuid4().hex[:6]}", num_samples=1, sampling=probe)
            producer.send_sync(topics.name("prompts"), m.validate(prompt))
            time.sleep(0.25)
            for r in read_topic(kafka, topics.name("completions"), m.CompletionGroup):
                if r.message.policy_version == 1:
                    started = r.timestamp_ms / 1000 - r.message.timings.latency_s
                    return round(started - published, 2), service.tracker.current
        raise RuntimeError(f"{mode}: no group of v1 within 120 s")
    finally:
        service.stop()
        thread.join(60)


def run(args: Any) -> dict[str, Any]:
    from onpolicy_sampler.weights import BASE_LABEL, ServedWeights

    tmp = Path(tempfile.mkdtemp(prefix="bench-handoff-"))
    common = dict(kafka_port=19392, kafka_controller_port=19393)
    lora_stack = load_settings(
        StackSettings, state_dir=tmp / "lora", vllm_port=18121, handoff="lora", **common
    )
    merged_stack = load_settings(
        StackSettings, state_dir=tmp / "merged", vllm_port=18122, handoff="merged", **common
    )
    broker = KafkaBroker(lora_stack)
    broker.start()
    model = ensure_default_model(lora_stack)
    servers = {"lora": VllmServer(lora_stack, model), "merged": VllmServer(merged_stack, model)}
    kafka = KafkaSettings(bootstrap_servers=broker.bootstrap, linger_ms=0)
    ready_s: dict[str, float] = {}
    try:
        started = time.monotonic()
        adapter, merged = train_policy(model, tmp)
        train_s = round(time.monotonic() - started, 1)
        for mode, server in servers.items():
            ready_s[mode] = round(server.start(timeout=900), 1)
        handoffs, policies = {}, {}
        for mode, server in servers.items():
            handoffs[mode], policies[mode] = handoff(kafka, server.url, mode, adapter, merged, tmp)
        name = servers["lora"].settings.served_model_name
        lora_url, merged_url = servers["lora"].url, servers["merged"].url
        http = httpx.Client(base_url=merged_url, timeout=300)
        weights = ServedWeights(http)
        label = policies["merged"].label

        def merged_base() -> float:
            weights.reload(str(model), BASE_LABEL)
            return tok_s(merged_url, name)

        def merged_policy() -> float:
            weights.reload(str(merged), label)
            return tok_s(merged_url, name)

        passes = {
            ("lora", "base"): lambda: tok_s(lora_url, name),
            ("merged", "base"): merged_base,
            ("lora", "policy"): lambda: tok_s(lora_url, policies["lora"].model),
            ("merged", "policy"): merged_policy,
        }
        # Warm every path once (first requests compile and fill caches), then measure.
        figures: dict[tuple[str, str], list[float]] = {k: [] for k in passes}
        for key in passes:
            url = lora_url if key[0] == "lora" else merged_url
            if key == ("merged", "base"):
                weights.reload(str(model), BASE_LABEL)
            if key == ("merged", "policy"):
                weights.reload(str(merged), label)
            model_name = policies["lora"].model if key == ("lora", "policy") else name
            asyncio.run(_load(url, model_name, requests=4))
        for _ in range(1 if args.quick else 2):
            for key, fn in passes.items():
                figures[key].append(fn())
        http.close()
    finally:
        for server in servers.values():
            server.stop()
        broker.stop()
    best = {k: max(v) for k, v in figures.items()}
    best_base = max(best[("lora", "base")], best[("merged", "base")])
    ratio = round(best[("merged", "policy")] / best_base, 3)
    modes = {
        mode: {
            "base_tok_s": figures[(mode, "base")],
            "policy_tok_s": figures[(mode, "policy")],
            "policy_vs_best_base": round(best[(mode, "policy")] / best_base, 3),
            "handoff_s": handoffs[mode],
            "server_ready_s": ready_s[mode],
        }
        for mode in ("merged", "lora")
    }
    summary = (
        f"**Policy hand-off** (`python -m benchmarks handoff`, {REQUESTS} chat requests x "
        f"n={N} x {TOKENS} tokens, `ignore_eos`, two servers side by side, passes alternating): "
        f"a trained policy handed off as merged weights (the default) samples at "
        f"{best[('merged', 'policy')]} tok/s, **ratio {ratio}** of the best base model "
        f"({best_base} tok/s; goal >= 0.9), hand-off **{handoffs['merged']} s** from the "
        f"PolicyUpdate to the first request it served (goal < 5 s). As a LoRA adapter: "
        f"{best[('lora', 'policy')]} tok/s ({modes['lora']['policy_vs_best_base']}), "
        f"hand-off {handoffs['lora']} s; the base model on the LoRA server "
        f"{best[('lora', 'base')]} tok/s, on the merged server {best[('merged', 'base')]}. "
        f"Servers ready in {ready_s['lora']} s (lora) and {ready_s['merged']} s (merged: "
        "torch.compile)."
    )
    return {
        "ratio": ratio,
        "handoff_s": handoffs["merged"],
        "goal": "ratio >= 0.9 and handoff_s < 5 (CPU, default model)",
        "default_mode": "merged",
        "modes": modes,
        "best_base_tok_s": best_base,
        "train_s": train_s,
        "setup": {
            "requests": REQUESTS,
            "n": N,
            "max_tokens": TOKENS,
            "passes": len(figures[("lora", "base")]),
        },
        "summary": summary,
    }
