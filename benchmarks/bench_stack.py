"""Start-up of the local stack once cached: Kafka broker (target < 30 s) and vLLM server."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

from onpolicy.settings import load_settings
from onpolicy.stack import KafkaBroker, StackSettings, VllmServer, ensure_default_model
from onpolicy.stack.kafka import ensure_kafka_jars


def run(args: Any) -> dict[str, Any]:
    state = Path(tempfile.mkdtemp(prefix="bench-stack-"))
    stack = load_settings(
        StackSettings,
        state_dir=state,
        kafka_port=19292,
        kafka_controller_port=19293,
        vllm_port=18021,
    )
    ensure_kafka_jars(stack)  # cached: not timed
    model = ensure_default_model(stack)
    broker = KafkaBroker(stack)
    started = time.perf_counter()
    broker.start()
    fresh = time.perf_counter() - started
    broker.stop()
    started = time.perf_counter()
    broker.start()  # with existing data
    restart = time.perf_counter() - started
    broker.stop()
    vllm_s = None
    if not args.quick:
        server = VllmServer(stack, model)
        started = time.perf_counter()
        server.start()
        vllm_s = time.perf_counter() - started
        server.stop()
    return {
        "kafka_ready_fresh_s": round(fresh, 1),
        "kafka_ready_restart_s": round(restart, 1),
        "kafka_goal_s": 30,
        "vllm_ready_s": None if vllm_s is None else round(vllm_s, 1),
        "summary": (
            f"**Local stack** (`python -m benchmarks stack`): Kafka ready in "
            f"{fresh:.1f} s from a fresh data folder and {restart:.1f} s on restart "
            f"(goal < 30 s, jars cached)"
            + ("" if vllm_s is None else f"; vLLM CPU server ready in {vllm_s:.0f} s")
            + "."
        ),
    }
