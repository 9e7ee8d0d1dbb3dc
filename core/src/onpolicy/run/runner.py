"""``onpolicy run``: the local stack, the services, R rounds, the run folder and report.

Strict mode (``max_staleness=0``): a round's prompts are published only once the sampler
serves the policy the round trains, so every pair comes from the policy it improves and no
sample is wasted. Overlap mode (``max_staleness=1``): the next round's prompts go out as soon
as the current round is sampled, while the trainer trains (one-step-off).
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
from onpolicy.run.lineage import Ahead, Lineage, RoundRecord, tagged
from onpolicy.run.prompts import PromptSource, demo_prompts, load_prompts
from onpolicy.run.report import write_report
from onpolicy.run.settings import RunSettings
from onpolicy.secrets import redact, write_private
from onpolicy.stack import KafkaBroker, StackSettings, VllmServer, ensure_default_model

log = logging.getLogger(__name__)


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

    def _eval_prompts(self, round_: int) -> list[m.Prompt]:
        s = self.settings
        return [
            tagged(p, round_, "eval", {"temperature": s.eval_temperature}, s.eval_samples)
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
        s = self.settings
        overlap = s.max_staleness > 0
        early = 0  # this round's training prompts already published (overlap mode)
        overlap_s = 0.0
        version = 0
        for r in range(s.rounds + 1):
            record = RoundRecord(round=r, policy_version=version, overlap_s=overlap_s)
            lineage.rounds.append(record)
            lineage.wait(lambda v=version: lineage.sampler_version() >= v, f"sampler on v{version}")
            train = self._train_prompts(r) if r < s.rounds and not early else []
            lineage.sample_and_judge(record, train, self._eval_prompts(r), early)
            early, ahead, overlap_s = 0, None, 0.0
            if overlap and r + 1 < s.rounds:
                # One-step-off: the next round is sampled while this one trains.
                nxt = self._train_prompts(r + 1)
                ahead = Ahead(round=r + 1, groups=len(nxt), published_at=time.monotonic())
                lineage.publish(nxt)
                early = len(nxt)
            self._print_round(lineage, record)
            if r < s.rounds:
                overlap_s = lineage.train(record, ahead)
                version = record.next_version

    def off_policy(self, lineage: Lineage, pairs_per_round: list[int]) -> None:
        """As many pairs per round as the on-policy run, all sampled by the initial policy."""
        s = self.settings
        everything = [p for r in range(s.rounds) for p in self._train_prompts(r)]
        self.status("[offpolicy] sampling every round's prompts with the initial policy")
        record = RoundRecord(round=0, policy_version=0)
        lineage.rounds.append(record)
        lineage.publish(everything)
        lineage.sample_and_judge(record, [], self._eval_prompts(0), s.prompts_per_round)
        available = self._off_policy_pairs(lineage, len(everything))
        # A group whose samples tie makes no pair, and the initial policy ties more often than
        # a trained one (its answers run into max_tokens alike): top up with the prompt set's
        # next prompts, as many rounds' worth at most as the run has, so that both lineages
        # train on as many pairs where the set allows.
        wanted, extra = sum(pairs_per_round), s.rounds
        while (
            available < wanted
            and extra < 2 * s.rounds
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
            lineage.sample_and_judge(record, [], self._eval_prompts(r + 1))
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
                )
                on = Lineage(name="onpolicy", prefix=prefix, **common)
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
                        trainer_extra={"max_staleness": s.rounds},
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
