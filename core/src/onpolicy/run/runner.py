"""``onpolicy run``: the local stack, the services, R rounds, the run folder and report.

The run is a client of the round protocol, as a deployment's user is: it publishes the
training prompts and the held-out prompts, and the services the deployment runs plan,
sample, judge, train and evaluate every round themselves (strict: every pair sampled by the
policy its round improves; ``max_staleness`` 1: one-step-off, the next round sampled while
the current one trains). The run watches the topics and writes the report. The off-policy
comparison (``--compare-offpolicy``) drives its own rounds: all its pairs are sampled by v0.
"""

from __future__ import annotations

import contextlib
import json
import logging
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from onpolicy import messages as m
from onpolicy.run.lineage import Lineage, RoundRecord, tagged
from onpolicy.run.prompts import PromptSource, demo_prompts, load_prompts
from onpolicy.run.report import write_report
from onpolicy.run.settings import RunSettings
from onpolicy.secrets import redact, write_private
from onpolicy.stack import KafkaBroker, StackSettings, VllmServer, ensure_default_model

log = logging.getLogger(__name__)

# Training prompts published per pair a run's rounds need (prompts_per_round pairs per
# round), at most: a group whose samples tie, or none of whose answers ended, makes no pair
# (the demo's yield is ~0.8 pairs per prompt; 40-token answers, mostly cut off, ~0.3). The
# trainer plans only what each round needs; the rest stays in Kafka, never sampled.
PROMPT_HEADROOM = 4


@dataclass
class Stack:
    kafka: Any
    vllm_url: str
    served_model_name: str
    model_path: Path
    stop: Any


@contextlib.contextmanager
def local_stack(run: RunSettings, stack: StackSettings, status) -> Iterator[Stack]:
    """The broker and vLLM server: reused if running, else started (and stopped after)."""
    if run.external_stack:
        model = run.model or ensure_default_model(stack)
        yield Stack(run.kafka, run.vllm_url or stack.vllm_url, stack.served_model_name, model, None)
        return
    broker = KafkaBroker(stack)
    was_running = broker.process.running()
    status("starting Apache Kafka")
    broker.start()
    kafka = run.kafka.model_copy(update={"bootstrap_servers": broker.bootstrap})
    status("preparing the model and vLLM (the first run fetches and converts them)")
    model = run.model or ensure_default_model(stack)
    server = VllmServer(stack, model)
    vllm_was_running = server.process.running()
    status(f"starting vLLM for {stack.served_model_name}")
    server.start()
    try:
        yield Stack(kafka, server.url, stack.served_model_name, model, None)
    finally:
        if not vllm_was_running:
            server.stop()
        if not was_running:
            broker.stop()


def take(source: PromptSource, count: int, start: int, epochs: bool) -> list[m.Prompt]:
    prompts = source.prompts
    if not epochs and start + count > len(prompts):
        raise ValueError(
            f"{source.path} has {len(prompts)} prompts, the run needs {start + count}; lower "
            "rounds/prompts_per_round or set prompt_epochs to reuse them"
        )
    return [prompts[(start + i) % len(prompts)] for i in range(count)]


class Runner:
    def __init__(self, settings: RunSettings, stack: StackSettings, status=print):
        self.settings = settings
        self.stack_settings = stack
        self.status = status
        run_id = settings.run_id or datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
        self.run_id = run_id
        self.run_dir = (settings.runs_dir / run_id).resolve()
        self.train_source = load_prompts(settings.prompts) if settings.prompts else demo_prompts()
        self.eval_source = (
            load_prompts(settings.eval_prompts) if settings.eval_prompts else demo_prompts("eval")
        )
        # Validate the sizes before starting anything.
        take(
            self.train_source,
            settings.rounds * settings.prompts_per_round,
            0,
            settings.prompt_epochs,
        )
        self.evaluation = self.eval_source.prompts[: settings.eval_size]

    def _write_settings(self) -> None:
        """``settings.json``: the run's settings, secrets redacted, readable by the owner only."""
        settings = redact(self.settings.model_dump(mode="json"))
        write_private(self.run_dir / "settings.json", json.dumps(settings, indent=2) + "\n")

    def _link_latest(self) -> None:
        latest = self.settings.runs_dir / "latest"
        with contextlib.suppress(FileNotFoundError):
            latest.unlink()
        latest.symlink_to(self.run_id)

    def _heldout_prompts(self) -> list[m.Prompt]:
        """The held-out set, published once to each lineage's `heldout` topic."""
        s = self.settings
        return [
            tagged(p, 0, "eval", {"temperature": s.eval_temperature}, s.eval_samples)
            for p in self.evaluation
        ]

    def _train_prompts(self, round_: int) -> list[m.Prompt]:
        s = self.settings
        batch = take(
            self.train_source, s.prompts_per_round, round_ * s.prompts_per_round, s.prompt_epochs
        )
        return [tagged(p, round_, "train") for p in batch]

    # ------------------------------------------------------------------ the loops
    def on_policy(self, lineage: Lineage) -> None:
        """A client of the round protocol, as a deployment's user is: publish the training
        prompts, then watch the services plan, sample, judge, train and evaluate each round.

        The trainer plans rounds of ``prompts_per_round`` pairs on the rounds topic and the
        sampler takes only the prompts a round needs, each sampled by the policy the round
        improves (``max_staleness`` 1: one version older at most); unplanned prompts stay in
        Kafka. More prompts are published than the rounds should need, because ties make no
        pair: up to ``PROMPT_HEADROOM`` per pair, as far as the prompt set allows.
        """
        s = self.settings
        cursor = 0

        def publish(count: int) -> int:
            """The next ``count`` training prompts of the set (fewer where it ends)."""
            nonlocal cursor
            if not s.prompt_epochs:
                count = min(count, len(self.train_source.prompts) - cursor)
            if count <= 0:
                return 0
            batch = take(self.train_source, count, cursor, s.prompt_epochs)
            # Tagged with a nominal round (which the ids carry, so a reused prompt is a new
            # record); which round trains a prompt is the trainer's plan.
            lineage.publish(
                [
                    tagged(p, (cursor + i) // s.prompts_per_round, "train")
                    for i, p in enumerate(batch)
                ]
            )
            cursor += len(batch)
            return len(batch)

        first = publish(s.rounds * s.prompts_per_round * PROMPT_HEADROOM)
        self.status(f"[{lineage.name}] published {first} training prompts")
        for r in range(s.rounds + 1):
            record = RoundRecord(round=r, policy_version=r)
            lineage.rounds.append(record)
            lineage.watch(
                record, final=r == s.rounds, more=lambda: publish(s.prompts_per_round * 4)
            )
            self._print_round(lineage, record)

    def off_policy(self, lineage: Lineage, pairs_per_round: list[int]) -> None:
        """As many pairs per round as the on-policy run, all sampled by the initial policy."""
        s = self.settings
        everything = [p for r in range(s.rounds) for p in self._train_prompts(r)]
        self.status("[offpolicy] sampling every round's prompts with the initial policy")
        record = RoundRecord(round=0, policy_version=0)
        lineage.rounds.append(record)
        lineage.publish(everything)
        lineage.sample_and_judge(record, [], s.prompts_per_round)
        available = self._off_policy_pairs(lineage, len(everything))
        # A group whose samples tie makes no pair, and the initial policy ties more often than
        # a trained one (its answers run into max_tokens alike): top up with the prompt set's
        # next prompts, as many rounds' worth at most as the run has, so that both lineages
        # train on as many pairs where the set allows. The on-policy lineage may publish up to
        # four more rounds' worth per round, so the cap is the same (2x ran dry: 51 of 98).
        wanted, extra = sum(pairs_per_round), s.rounds
        while (
            available < wanted
            and extra < 5 * s.rounds
            and (
                s.prompt_epochs
                or (extra + 1) * s.prompts_per_round <= len(self.train_source.prompts)
            )
        ):
            more = self._train_prompts(extra)
            self.status(
                f"[offpolicy] {available} pairs, {wanted} wanted: sampling "
                f"{len(more)} more prompts with the initial policy"
            )
            lineage.publish(more)
            everything += more
            extra += 1
            available = self._off_policy_pairs(lineage, len(everything))
        self._print_round(lineage, record)
        for r in range(s.rounds):
            record.pairs = min(pairs_per_round[r], available)
            available -= record.pairs
            lineage.train(record)
            record = RoundRecord(round=r + 1, policy_version=record.next_version)
            lineage.rounds.append(record)
            lineage.sample_and_judge(record, [])
            self._print_round(lineage, record)

    @staticmethod
    def _off_policy_pairs(lineage: Lineage, groups: int) -> int:
        """The training pairs once all ``groups`` published training prompts are judged."""
        lineage.wait(
            lambda: (
                (lineage.refresh() or True)
                and sum(x.group.prompt.dataset_split == "train" for x in lineage.scored.records)
                >= groups
            ),
            "off-policy samples",
        )
        lineage.refresh()
        return sum(p.prompt.dataset_split == "train" for p in lineage.pairs.records)

    def _print_round(self, lineage: Lineage, record: RoundRecord) -> None:
        mean = "-" if record.eval_reward_mean is None else f"{record.eval_reward_mean:.3f}"
        self.status(
            f"[{lineage.name}] v{record.policy_version}: eval reward {mean}, "
            f"{record.pairs} pairs, sampled in {record.sampling_s:.0f}s",
            final=True,
        )

    def run(self) -> dict[str, Any]:
        s = self.settings
        self.run_dir.mkdir(parents=True, exist_ok=False)
        self._link_latest()
        self._write_settings()
        started = time.monotonic()
        lineages: list[Lineage] = []
        interrupted = False
        loop_s: float | None = None  # the on-policy rounds alone, without the stack's start

        def on_term(*_: object) -> None:
            raise KeyboardInterrupt

        previous = signal.signal(signal.SIGTERM, on_term)
        try:
            with local_stack(s, self.stack_settings, self.status) as stack:
                prefix = f"onpolicy.{self.run_id}."
                common = dict(
                    settings=s,
                    run_dir=self.run_dir,
                    kafka=stack.kafka,
                    vllm_url=stack.vllm_url,
                    served_model_name=stack.served_model_name,
                    model_path=stack.model_path,
                    status=self.status,
                    heldout=self._heldout_prompts(),
                )
                on = Lineage(name="onpolicy", prefix=prefix, protocol=True, **common)
                lineages.append(on)
                try:
                    on.start()
                    loop_started = time.monotonic()
                    self.on_policy(on)
                    loop_s = time.monotonic() - loop_started
                finally:
                    on.stop()
                if s.compare_offpolicy:
                    off = Lineage(
                        name="offpolicy",
                        prefix=f"onpolicy.{self.run_id}-off.",
                        sampler_extra={"adapter_prefix": "offpolicy"},
                        # A comparison of training data, all sampled by v0: the guard
                        # would drop it (rolled_back) and measure something else.
                        trainer_extra={"max_staleness": s.rounds, "evaluation": {"guard": False}},
                        **common,
                    )
                    lineages.append(off)
                    try:
                        off.start()
                        self.off_policy(off, [r.pairs for r in on.rounds[:-1]])
                    except (RuntimeError, TimeoutError) as exc:
                        # The comparison failing must not lose the on-policy run's report.
                        log.exception("off-policy comparison failed")
                        self.status(f"off-policy comparison failed: {exc}", final=True)
                    finally:
                        off.stop()
        except KeyboardInterrupt:
            interrupted = True
            self.status("interrupted: services and stack stopped", final=True)
        except Exception as exc:
            # A stage that failed (a timeout, a service that died) still leaves the report of
            # the rounds that finished, naming the error; the error then goes on to the caller.
            try:
                self._report(lineages, started, interrupted, loop_s, f"{type(exc).__name__}: {exc}")
            except Exception:
                log.exception("could not write the report of the failed run")
            raise
        finally:
            signal.signal(signal.SIGTERM, previous)
        return self._report(lineages, started, interrupted, loop_s)

    def _report(
        self,
        lineages: list[Lineage],
        started: float,
        interrupted: bool,
        loop_s: float | None,
        error: str | None = None,
    ) -> dict[str, Any]:
        return write_report(
            self.run_dir,
            self.run_id,
            self.settings,
            lineages,
            wall_s=time.monotonic() - started,
            interrupted=interrupted,
            loop_s=loop_s,
            error=error,
        )


def summary_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    return report["rounds"]


def dumps(report: dict[str, Any]) -> str:
    return json.dumps(report, indent=2)
