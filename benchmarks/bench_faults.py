"""The fault matrix: repeatable faults injected into short real runs of the loop.

Every cell is its own short run of the services started on their own (``Deployment``: one
sampler, one judge, one trainer, as pods run them) with the round protocol, on one local
Kafka broker and one vLLM CPU server shared by the cells (a cell that restarts them restarts
the shared ones), each cell on its own topics and in its own folder. A cell publishes
``PROMPTS`` demo prompts as JSON lines with a plain Kafka client (its poison records among
them), injects its fault when its moment comes, waits for ``ROUNDS`` policies and audits
what Kafka and the checkpoint store hold (``onpolicy.run.accounting``). A cell passes when:

- ``completed``: the run published its ``ROUNDS`` policies in time;
- ``versions``: the policy topic holds versions 1, 2, ... once each;
- ``no_pair_twice``: no pair id is in two saved rounds, and each round trained only pairs
  sampled by the policy it improves;
- ``no_prompt_lost``: every prompt is trained, dropped with a reason, or still waiting;
- ``dead_letters``: the dead-letter topic holds exactly the cell's poison records (none for
  a cell without poison), each with its reason.

The judge storms run the real judge service in this process with its LLM endpoint stubbed at
httpx's transport (the one paid remote API of the loop). Killed services are restarted by
the deployment's supervision (as Kubernetes restarts a pod). Written to
``benchmarks/results/faults.json`` (``cells``: ``{name, passed, detail}``).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
import traceback
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import httpx
from kafka import KafkaProducer

from benchmarks._faults import CATASTROPHIC, POISON, InProcessJudge, StormEndpoint, judge_cell
from onpolicy import messages as m
from onpolicy.bus import ensure_topics
from onpolicy.run.deployment import Deployment
from onpolicy.run.procs import free_port
from onpolicy.run.tail import TopicTail
from onpolicy.settings import KafkaSettings, TopicSettings, load_settings
from onpolicy.stack import KafkaBroker, StackSettings, VllmServer, ensure_default_model

# Room for most answers to end (SmolLM2 averages ~58 tokens): at 48 tokens and N=2 only 3 of
# 17 groups made a pair, and round 1 took nearly every prompt.
ROUNDS, ROUND_SIZE, N, MAX_TOKENS, PROMPTS = 2, 4, 3, 96, 32
MAX_PROMPT_TOKENS = 64  # the demo prompts have at most 60 tokens
POISON_AT = 2  # index among the published records: early, so round 1's plan covers it
# 300 s is ample on an idle machine; with two heavy jobs on 2 cores a DPO round of 5 pairs took
# 153 s and the baseline ran out of it (FAULTS_CELL_TIMEOUT_S).
CELL_TIMEOUT_S = float(os.environ.get("FAULTS_CELL_TIMEOUT_S", "600"))
CRASH_ENV = "ONPOLICY_TRAINER_CRASH_AT"
RESULTS = Path(__file__).parent / "results"  # the trainer's test hook (onpolicy_trainer.rounds)


@dataclass
class Stack:
    broker: KafkaBroker
    vllm: VllmServer
    kafka: KafkaSettings
    model: Path


@dataclass
class Ctx:
    """One cell's run, as its triggers see it."""

    stack: Stack
    topics: TopicSettings
    deployment: Deployment
    groups: TopicTail
    policies: TopicTail
    peak_buffer: float = 0.0

    def refresh(self) -> None:
        self.groups.refresh(timeout_ms=50)
        self.policies.refresh(timeout_ms=50)

    def versions(self) -> int:
        return len(self.policies.records)


@dataclass
class Trigger:
    """Fire ``act`` once, the first time ``when`` holds (checked at every poll)."""

    when: Callable[[Ctx], bool]
    act: Callable[[Ctx], str]
    fired: str | None = None

    def poll(self, ctx: Ctx) -> None:
        if self.fired is None and self.when(ctx):
            self.fired = self.act(ctx) or "fired"


@dataclass
class Cell:
    name: str
    fault: str  # what is done, in words
    triggers: list[Trigger] = field(default_factory=list)
    poison: list[str] = field(default_factory=list)  # keys of POISON
    judge: str = "function"  # function | regex | llm (in this process, stubbed)
    storm: tuple[int | None, float, float] = (None, 0.0, 0.0)  # status, seconds, answer delay
    kafka: dict[str, Any] = field(default_factory=dict)  # overrides of the services' Kafka
    trainer_env: dict[str, str] = field(default_factory=dict)


# ---------------------------------------------------------------- moments
def first_group(ctx: Ctx) -> bool:
    """Round 1 is being sampled (and judged): its first group is out."""
    return len(ctx.groups.records) >= 1


def round2_group(ctx: Ctx) -> bool:
    """v1 is served and round 2 is being sampled."""
    return any(g.policy_version >= 1 for g in ctx.groups.records)


def training(ctx: Ctx) -> bool:
    """The trainer took round 1's pairs out of its buffer: DPO is running."""
    if ctx.versions():
        return False
    try:
        buffered = ctx.deployment["trainer"].metric("onpolicy_trainer_buffer_pairs")
    except httpx.HTTPError:
        return False
    ctx.peak_buffer = max(ctx.peak_buffer, buffered)
    return ctx.peak_buffer >= 1 and buffered < ctx.peak_buffer


def after(seconds: float, when: Callable[[Ctx], bool]) -> Callable[[Ctx], bool]:
    seen: list[float] = []

    def check(ctx: Ctx) -> bool:
        if not seen and when(ctx):
            seen.append(time.monotonic())
        return bool(seen) and time.monotonic() - seen[0] >= seconds

    return check


# ---------------------------------------------------------------- faults
def kill(service: str) -> Callable[[Ctx], str]:
    def act(ctx: Ctx) -> str:
        ctx.deployment.kill(service)  # SIGKILL; the deployment's supervision restarts it
        ctx.refresh()
        return f"SIGKILL {service} with {len(ctx.groups.records)} groups, v{ctx.versions()} out"

    return act


def restart_broker(ctx: Ctx) -> str:
    started = time.monotonic()
    ctx.stack.broker.stop()
    time.sleep(5)  # down for a while, as a broker pod rescheduled
    ctx.stack.broker.start()
    return f"broker down and back in {time.monotonic() - started:.0f}s"


def restart_vllm(ctx: Ctx) -> str:
    started = time.monotonic()
    ctx.stack.vllm.stop()
    ctx.stack.vllm.start()  # a fresh server: no adapter loaded
    return f"vLLM stopped and ready again in {time.monotonic() - started:.0f}s"


# Run order: one cell of each kind first, so a matrix cut short by its budget covers them all.
PRIORITY = [
    "baseline",
    "trainer-kill-after-save",
    "judge-500-storm",
    "poison-undecodable",
    "trainer-kill-mid-training",
    "sampler-kill-mid-sampling",
    "broker-restart",
    "poison-regex",
    "judge-kill-mid-judging",
    "trainer-kill-after-publish",
    "judge-401-storm",
    "poison-too-long",
    "poison-oversized",
    "judge-429-storm",
    "slow-trainer-round",
    "poison-empty-prompt",
    "poison-wrong-shape",
    "vllm-restart",
    "slow-judge-backend",
    "sampler-kill-round-2",
    "trainer-kill-mid-sampling",
]


def cells() -> list[Cell]:
    every = {c.name: c for c in _cells()}
    return [every[name] for name in PRIORITY] + [c for n, c in every.items() if n not in PRIORITY]


def _cells() -> list[Cell]:
    storm = "judge endpoint answers {} for {:.0f}s{}, then answers normally"
    return [
        Cell("baseline", "no fault"),
        Cell(
            "sampler-kill-mid-sampling",
            "SIGKILL the sampler once round 1's first group is out",
            [Trigger(first_group, kill("sampler0"))],
        ),
        Cell(
            "sampler-kill-round-2",
            "SIGKILL the sampler while it samples round 2 with v1",
            [Trigger(round2_group, kill("sampler0"))],
        ),
        Cell(
            "judge-kill-mid-judging",
            "SIGKILL the judge once round 1's first group is out (it is judging)",
            [Trigger(first_group, kill("judge0"))],
        ),
        Cell(
            "trainer-kill-mid-sampling",
            "SIGKILL the trainer (the round's planner) while round 1 is sampled",
            [Trigger(first_group, kill("trainer"))],
        ),
        Cell(
            "trainer-kill-mid-training",
            "SIGKILL the trainer 3 s into round 1's DPO",
            [Trigger(after(3.0, training), kill("trainer"))],
        ),
        Cell(
            "trainer-kill-after-save",
            f"the trainer SIGKILLs itself after saving v1, before publishing it ({CRASH_ENV})",
            trainer_env={CRASH_ENV: "after_save@1"},
        ),
        Cell(
            "trainer-kill-after-publish",
            f"the trainer SIGKILLs itself after publishing v1, before committing its pairs "
            f"({CRASH_ENV})",
            trainer_env={CRASH_ENV: "after_publish@1"},
        ),
        Cell(
            "broker-restart",
            "stop the broker while round 1 is sampled, start it again 5 s later",
            [Trigger(first_group, restart_broker)],
        ),
        Cell(
            "vllm-restart",
            "stop vLLM while round 2 is sampled with v1 (the adapter is gone), start it again",
            [Trigger(round2_group, restart_vllm)],
        ),
        *(
            Cell(f"poison-{key.replace('_', '-')}", f"publish a {key} record", poison=[key])
            for key in ("undecodable", "wrong_shape", "empty_prompt", "too_long", "oversized")
        ),
        Cell(
            "poison-regex",
            f"regex judge; one prompt's reference is {CATASTROPHIC!r} (catastrophic for a "
            "backtracking engine, must be judged), one's a backreference (RE2 refuses it)",
            poison=["regex_backreference"],
            judge="regex",
        ),
        Cell(
            "judge-429-storm",
            storm.format("429 with Retry-After: 1", 15, ""),
            judge="llm",
            storm=(429, 15.0, 0.0),
        ),
        Cell("judge-500-storm", storm.format(500, 20, ""), judge="llm", storm=(500, 20.0, 0.0)),
        Cell("judge-401-storm", storm.format(401, 15, ""), judge="llm", storm=(401, 15.0, 0.0)),
        Cell(
            "slow-judge-backend",
            "judge's consumer max.poll.interval.ms 4 s; each LLM answer takes 6 s",
            judge="llm",
            storm=(None, 0.0, 6.0),
            kafka={"max_poll_interval_ms": 4000, "session_timeout_ms": 3000},
        ),
        Cell(
            "slow-trainer-round",
            "every service's max.poll.interval.ms 5 s; a DPO round takes longer",
            kafka={"max_poll_interval_ms": 5000, "session_timeout_ms": 3000},
        ),
    ]


# ---------------------------------------------------------------- one cell
def _records(cell: Cell) -> list[tuple[str, bytes]]:
    """What the cell publishes: the demo prompts with its poison at POISON_AT."""
    lines = (resources.files("onpolicy.data") / "demo_prompts.jsonl").read_text().splitlines()
    good = []
    for i, line in enumerate(lines[:PROMPTS]):
        if cell.judge == "regex":  # the regex scorer needs each prompt's reference
            obj = json.loads(line)
            obj["referenceAnswer"] = CATASTROPHIC if i == 1 else r"\w"
            line = json.dumps(obj)
        good.append(("good", line.encode()))
    for key in reversed(cell.poison):
        good.insert(POISON_AT, (key, POISON[key]))
    return good


def _publish(kafka: KafkaSettings, topic: str, records: list[tuple[str, bytes]]):
    """Publish with a plain client (no key, no headers), alternating the two partitions."""
    producer = KafkaProducer(
        bootstrap_servers=kafka.bootstrap_servers, max_request_size=8 * 1024 * 1024
    )
    poison = {}
    for i, (kind, value) in enumerate(records):
        meta = producer.send(topic, value, partition=i % 2).get(60)
        if kind != "good":
            poison[(meta.partition, meta.offset)] = kind
    producer.flush(30)
    producer.close()
    return poison


def _judge_config(cell: Cell) -> dict[str, Any]:
    if cell.judge == "regex":
        return {
            "backend": "function",
            "functions": [{"name": "concise"}, {"name": "regex", "weight": 0.25}],
        }
    return {"backend": "function", "functions": [{"name": "concise"}]}


def run_cell(stack: Stack, cell: Cell, root: Path) -> dict[str, Any]:
    folder = root / cell.name
    topics = TopicSettings(prefix=f"faults-{uuid.uuid4().hex[:6]}.", partitions=2)
    kafka = stack.kafka.model_copy(update=cell.kafka)
    ensure_topics(stack.kafka, topics)
    in_process = cell.judge == "llm"
    deployment = Deployment(
        kafka=stack.kafka if in_process else kafka,
        topics=topics,
        folder=folder,
        samplers=1,
        judges=0 if in_process else 1,
        sampler={
            "vllm_url": stack.vllm.url,
            "num_samples": N,
            "max_tokens": MAX_TOKENS,
            "max_prompt_tokens": MAX_PROMPT_TOKENS,
            "concurrency": 8,
            "adapter_prefix": f"{topics.prefix.strip('.')}-policy",
            "adapter_cache_dir": str(folder / "adapters"),
            "adapter_uri_prefixes": [str(folder / "checkpoints")],
        },
        judge=_judge_config(cell),
        trainer={
            "model": str(stack.model),
            "checkpoint_uri": str(folder / "checkpoints"),
            "round_size": ROUND_SIZE,
            "round_timeout_s": 30.0,
            "max_length": MAX_PROMPT_TOKENS + MAX_TOKENS,
            "learning_rate": 1e-3,
            "per_device_batch_size": 2,
        },
    )
    deployment["trainer"].env.update(cell.trainer_env)
    for service in deployment.services.values():
        service.policy = type(service.policy)(backoff_s=0.5)  # quick restarts, same limit
    judge = None
    if in_process:
        status, storm_s, delay_s = cell.storm
        endpoint = StormEndpoint(status, storm_s, delay_s)
        judge = InProcessJudge(kafka, topics, endpoint)
    started = time.monotonic()
    completed, error, notes = False, None, []
    ctx, poison = None, {}
    try:
        deployment.start()
        if judge is not None:
            judge.start()
        poison = _publish(stack.kafka, topics.name("prompts"), _records(cell))
        ctx = Ctx(
            stack,
            topics,
            deployment,
            TopicTail(stack.kafka, topics.name("completions"), m.CompletionGroup),
            TopicTail(stack.kafka, topics.name("policy"), m.PolicyUpdate),
        )

        def done() -> bool:
            ctx.refresh()
            for trigger in cell.triggers:
                trigger.poll(ctx)
            return ctx.versions() >= ROUNDS

        deployment.wait(done, CELL_TIMEOUT_S, f"{ROUNDS} policies")
        completed = all(t.fired for t in cell.triggers)
        if not completed:
            error = "the fault's moment never came"
    except Exception as exc:
        error = f"{type(exc).__name__}: {str(exc)[:600]}"
    finally:
        if judge is not None:
            judge.stop()
            notes.append(f"stub endpoint answered {endpoint.counts}")
        if ctx is not None:
            notes += [f"fault: {t.fired}" for t in cell.triggers]
            ctx.groups.close()
            ctx.policies.close()
        restarts = [
            f"{name} exit {r.exit_code} after {r.uptime_s}s"
            for name, s in deployment.services.items()
            for r in s.restarts
        ]
        _stop_all(deployment)
    wall = time.monotonic() - started
    try:
        verdict, facts = judge_cell(
            stack.kafka,
            topics,
            folder / "checkpoints",
            rounds=ROUNDS,
            completed=completed,
            error=error,
            poison=poison,
        )
    except Exception as exc:  # the audit itself failed: the cell cannot pass
        return {
            "name": cell.name,
            "passed": False,
            "detail": f"audit failed: {exc!r}; run error: {error}",
            "fault": cell.fault,
            "wall_s": round(wall, 1),
        }
    if cell.judge == "regex":
        facts["catastrophic_pattern_judged"] = _catastrophic_judged(stack.kafka, topics)
        verdict.check(
            "catastrophic_judged",
            facts["catastrophic_pattern_judged"],
            "the prompt whose reference is the catastrophic pattern was scored",
        )
    if not verdict.passed:
        notes.append("logs:\n" + deployment.log_tails(8))
    return {
        "name": cell.name,
        "passed": verdict.passed,
        "detail": "; ".join(verdict.notes + notes[:3]),
        "fault": cell.fault,
        "checks": verdict.checks,
        "restarts": restarts,
        "wall_s": round(wall, 1),
        **facts,
        **({"log_tails": notes[-1]} if not verdict.passed else {}),
    }


def _stop_all(deployment: Deployment) -> None:
    """SIGTERM every service at once (each drains on its own; one at a time took minutes)."""
    with ThreadPoolExecutor(len(deployment.services)) as pool:
        list(pool.map(lambda s: s.stop(), deployment.services.values()))


def _catastrophic_judged(kafka: KafkaSettings, topics: TopicSettings) -> bool:
    """Whether the prompt whose reference is the catastrophic pattern was scored."""
    from onpolicy.bus import read_topic

    return any(
        r.message.group.prompt.reference_answer == CATASTROPHIC
        for r in read_topic(kafka, topics.name("scored"), m.ScoredGroup)
    )


# ---------------------------------------------------------------- the matrix
def _commit() -> str:
    try:
        out = subprocess.run(
            ["git", "describe", "--always", "--dirty", "--abbrev=40"],
            capture_output=True,
            text=True,
        )
        return out.stdout.strip()
    except OSError:
        return ""


def run(args: Any) -> dict[str, Any]:
    wanted = set(getattr(args, "cells", None) or [])
    chosen = [c for c in cells() if not wanted or c.name in wanted]
    state = Path(tempfile.mkdtemp(prefix="bench-faults-"))
    settings = load_settings(
        StackSettings,
        state_dir=state,
        kafka_port=free_port(),
        kafka_controller_port=free_port(),
        vllm_port=free_port(),
    )
    # FAULTS_DEADLINE (unix seconds): start no cell that would end past it (a shared
    # machine's slot, a working day's end); the cells not run are listed as such.
    deadline = float(os.environ.get("FAULTS_DEADLINE", "0"))
    started = time.monotonic()
    broker = KafkaBroker(settings)
    broker.start()
    model = ensure_default_model(settings)
    server = VllmServer(settings, model)
    results = []
    try:
        server.start()
        # Short group timeouts: a killed consumer's partitions go to its successor quickly.
        kafka = KafkaSettings(
            bootstrap_servers=broker.bootstrap,
            linger_ms=0,
            session_timeout_ms=10_000,
            heartbeat_interval_ms=1_000,
        )
        stack = Stack(broker, server, kafka, model)
        for cell in chosen:
            walls = [r["wall_s"] for r in results if r.get("wall_s")]
            cost = sum(walls) / len(walls) if walls else 150.0  # a cell's cost so far
            if deadline and time.time() + cost > deadline:
                results.append(
                    {"name": cell.name, "passed": None, "detail": "not run: past FAULTS_DEADLINE"}
                )
                continue
            print(f"-- cell {cell.name}: {cell.fault}", flush=True)
            try:
                result = run_cell(stack, cell, state / "cells")
            except Exception:
                result = {"name": cell.name, "passed": False, "detail": traceback.format_exc()}
            print(
                f"   {'PASS' if result['passed'] else 'FAIL'} in {result.get('wall_s')}s: "
                f"{result['detail'][:400]}",
                flush=True,
            )
            results.append(result)
            # Written after every cell: a matrix stopped part-way keeps what it measured.
            partial = _result(results, wanted, time.monotonic() - started)
            (RESULTS / "faults.json").write_text(json.dumps(partial | {"partial": True}, indent=2))
    finally:
        server.stop()
        broker.stop()
        shutil.rmtree(state / "cells", ignore_errors=True)
    return _result(results, wanted, time.monotonic() - started)


def _result(results: list[dict[str, Any]], wanted: set[str], wall: float) -> dict[str, Any]:
    rerun = sorted(wanted)
    if wanted:  # a rerun of some cells: keep the last run's results of the others
        results = _merged(results)
    ran = [r for r in results if r["passed"] is not None]
    passed = sum(bool(r["passed"]) for r in ran)
    cells_s = sum(r.get("wall_s") or 0 for r in results)
    verdict = {True: "pass", False: "**FAIL**", None: "not run"}
    rows = "\n".join(
        f"| {r['name']} | {verdict[r['passed']]} | {r.get('wall_s', '')} | {_short(r)} |"
        for r in results
    )
    summary = (
        f"**Fault matrix** (`python -m benchmarks faults`): {passed} of {len(ran)} cells run "
        f"pass, {len(results) - len(ran)} not run ({cells_s / 60:.1f} min of cells on 2 CPU "
        "cores"
        + (f"; {', '.join(rerun)} rerun after the matrix" if rerun else "")
        + f"). Each cell: {ROUNDS} rounds of "
        f"{ROUND_SIZE} pairs, N={N}, {MAX_TOKENS} max tokens, {PROMPTS} prompts published by "
        "a plain Kafka client; checks: run completed, policy versions 1..R once each, no pair "
        "trained twice, no prompt lost, dead-letter topic = exactly the poison records.\n\n"
        "| cell | result | s | what happened |\n|---|---|---|---|\n" + rows
    )
    return {
        "cells": [{k: r.get(k) for k in ("name", "passed", "detail")} for r in results],
        "passed": passed,
        "run": len(ran),
        "total": len(results),
        "matrix_wall_s": round(wall, 1),  # this run: stack start, its cells, stack stop
        "cells_wall_s": round(cells_s, 1),
        "commit": _commit(),
        "rerun_cells": rerun,  # run alone, after the matrix (their wall time is in theirs)
        "setup": {
            "rounds": ROUNDS,
            "round_size": ROUND_SIZE,
            "n": N,
            "max_tokens": MAX_TOKENS,
            "prompts": PROMPTS,
            "samplers": 1,
            "judges": 1,
        },
        "full": results,
        "summary": summary,
    }


def _merged(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """These results in place of the same cells' in the last ``faults.json``, in matrix order."""
    path = RESULTS / "faults.json"
    previous = json.loads(path.read_text()).get("full", []) if path.exists() else []
    by_name = {r["name"]: r for r in previous} | {r["name"]: r for r in results}
    order = [c.name for c in cells()]
    rank = {name: i for i, name in enumerate(order)}
    return sorted(by_name.values(), key=lambda r: rank.get(r["name"], len(rank)))


def _short(result: dict[str, Any]) -> str:
    failed = [k for k, ok in (result.get("checks") or {}).items() if not ok]
    bits = [f"failed: {', '.join(failed)}"] if failed else []
    bits += result.get("restarts") or []
    dead = result.get("dead_letters") or {}
    bits += [f"DLQ {v[:70]}" for v in dead.values()]
    return "; ".join(bits).replace("|", "/") or "-"
