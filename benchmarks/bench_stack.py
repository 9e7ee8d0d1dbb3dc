"""Start-up of the local stack once cached: Kafka broker (target < 30 s) and vLLM server;
and what an idle broker costs the cores beside it, with the stack's "small" profile and with
Kafka's own defaults, side by side in one run.

An idle broker's cost is its CPU time and how often its threads wake: on a machine with as
many busy training (or vLLM) threads as cores, each wake-up preempts one of them.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any

from onpolicy.settings import load_settings
from onpolicy.stack import KafkaBroker, StackSettings, VllmServer, ensure_default_model
from onpolicy.stack.kafka import ensure_kafka_jars

IDLE_SETTLE_S = 30  # after ready: start-up work (topic creation, first compiles) settles
IDLE_WINDOW_S = 30


def _threads(pid: int) -> tuple[float, int]:
    """CPU seconds and times scheduled, summed over the process's threads (Linux /proc)."""
    cpu, slices = 0.0, 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            run_ns, _wait_ns, count = map(
                int, Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()
            )
        except (FileNotFoundError, ValueError):
            continue  # the thread ended between listing and reading
        cpu += run_ns / 1e9
        slices += count
    return cpu, slices


def idle_broker(stack: StackSettings, profile: str) -> dict[str, float]:
    """Start a fresh broker with ``profile``; its CPU ms/s and wake-ups/s while idle."""
    settings = stack.model_copy(
        update={
            "kafka_profile": profile,
            "state_dir": Path(tempfile.mkdtemp(prefix=f"idle-{profile}-")),
        }
    )
    broker = KafkaBroker(settings)
    ready = broker.start()
    try:
        pid = broker.process.pid()
        assert pid is not None
        time.sleep(IDLE_SETTLE_S)
        cpu0, slices0 = _threads(pid)
        started = time.monotonic()
        time.sleep(IDLE_WINDOW_S)
        cpu1, slices1 = _threads(pid)
        seconds = time.monotonic() - started
    finally:
        broker.stop()
    return {
        "ready_s": round(ready, 1),
        "idle_cpu_ms_per_s": round((cpu1 - cpu0) * 1000 / seconds, 1),
        "idle_wakeups_per_s": round((slices1 - slices0) / seconds, 1),
    }


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
    idle: dict[str, dict[str, float]] = {}
    if Path("/proc/self/task").exists():
        for profile in ("kafka", "small"):
            idle[profile] = idle_broker(stack, profile)
    return {
        "kafka_ready_fresh_s": round(fresh, 1),
        "kafka_ready_restart_s": round(restart, 1),
        "kafka_goal_s": 30,
        "vllm_ready_s": None if vllm_s is None else round(vllm_s, 1),
        "idle_broker": idle,
        "summary": (
            f"**Local stack** (`python -m benchmarks stack`): Kafka ready in "
            f"{fresh:.1f} s from a fresh data folder and {restart:.1f} s on restart "
            f"(goal < 30 s, jars cached)"
            + ("" if vllm_s is None else f"; vLLM CPU server ready in {vllm_s:.0f} s")
            + "."
            + _idle_summary(idle)
        ),
    }


def _idle_summary(idle: dict[str, dict[str, float]]) -> str:
    if not idle:
        return ""
    small, kafka = idle["small"], idle["kafka"]
    return (
        f" An idle broker ({IDLE_WINDOW_S} s, {IDLE_SETTLE_S} s after ready), stack profile "
        f"`small` vs Kafka's defaults: {small['idle_cpu_ms_per_s']} vs "
        f"{kafka['idle_cpu_ms_per_s']} ms of CPU a second "
        f"({small['idle_cpu_ms_per_s'] / kafka['idle_cpu_ms_per_s']:.2f}x), "
        f"{small['idle_wakeups_per_s']:.0f} vs {kafka['idle_wakeups_per_s']:.0f} thread "
        f"wake-ups a second ({small['idle_wakeups_per_s'] / kafka['idle_wakeups_per_s']:.2f}x)."
    )
