"""The evaluation of every policy version, and the regression guard's verdicts.

The samplers sample the `heldout` prompts with each version they serve
(``onpolicy_sampler.evaluation``) and the judge scores them like any group (no pairs: their
split is ``eval``). The evaluator follows three topics from their beginning, outside any
consumer group: `heldout` (how many held-out prompts there are), `scored` (the held-out groups'
scores, by the version that sampled them) and `evals` (what it published before a restart).
Once every held-out prompt is scored for a version (or ``timeout_s`` after its first score) it
publishes that version's :class:`EvalResult` (key ``eval-v<N>``) and the Prometheus gauges.

The verdict compares the version with the best earlier *promoted* version: ``rejected`` when
its mean is below that version's by more than ``margin_se`` standard errors of the difference
(sqrt(se_a^2 + se_b^2)). A rejection is acted on at once (``on_rejected``: the trainer
publishes the next version with the best version's weights, ``rounds.RoundRunner.rollback``),
and a round about to train on a policy's pairs asks for its verdict first, so a rejected
policy is rolled back whether or not it made pairs.

All of this is recomputed from Kafka after a restart; results already published keep their
verdict (read back from `evals`).
"""

from __future__ import annotations

import logging
import math
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from kafka import KafkaConsumer
from kafka.structs import TopicPartition

from onpolicy import messages as m
from onpolicy.bus import Producer
from onpolicy.serde import RecordError, decode
from onpolicy.telemetry import Metrics
from onpolicy_trainer.settings import EvaluationSettings, TrainerSettings

log = logging.getLogger(__name__)

EVAL_SPLIT = "eval"
PROMOTED, REJECTED, UNGUARDED = "promoted", "rejected", "unguarded"


@dataclass
class _PromptScores:
    label: str
    scores: list[float]
    finished: int
    tokens: list[int]


@dataclass
class _Version:
    first_seen: float  # time.monotonic() of its first held-out score
    prompts: dict[str, _PromptScores] = field(default_factory=dict)
    judge_id: str = ""


def _mean_se(values: list[float]) -> tuple[float, float]:
    mean = statistics.fmean(values)
    se = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else 0.0
    return mean, se


def summarize(version: int, seen: _Version, expected: int, complete: bool) -> m.EvalResult:
    """The EvalResult of ``version``'s scores (no verdict yet).

    The standard error is taken over per-prompt means: the samples of one prompt are not
    independent of each other, the prompts are (a draw from the held-out set)."""
    per_prompt = [statistics.fmean(p.scores) for p in seen.prompts.values()]
    samples = [s for p in seen.prompts.values() for s in p.scores]
    tokens = [t for p in seen.prompts.values() for t in p.tokens]
    _, se = _mean_se(per_prompt)
    result = m.EvalResult(
        version=version,
        mean=statistics.fmean(samples),
        se=se,
        prompts=len(seen.prompts),
        expected=expected,
        samples=len(samples),
        finished_rate=sum(p.finished for p in seen.prompts.values()) / len(samples),
        mean_tokens=statistics.fmean(tokens) if tokens else 0.0,
        complete=complete,
        judge_id=seen.judge_id,
        created_unix_ms=int(time.time() * 1000),
    )
    by_label: dict[str, list[float]] = {}
    for p in seen.prompts.values():
        if p.label:
            by_label.setdefault(p.label, []).append(statistics.fmean(p.scores))
    for label, means in sorted(by_label.items()):
        mean, label_se = _mean_se(means)
        result.labels.add(label=label, prompts=len(means), mean=mean, se=label_se)
    return m.validate(result)


def judge(result: m.EvalResult, earlier: list[m.EvalResult], settings: EvaluationSettings) -> None:
    """Set ``result``'s verdict against the best earlier promoted version (in place)."""
    promoted = [r for r in earlier if r.version < result.version and r.verdict != REJECTED]
    if promoted:
        best = max(promoted, key=lambda r: (r.mean, r.version))
        result.best_version, result.best_mean, result.best_se = best.version, best.mean, best.se
    else:
        result.best_version, result.best_mean, result.best_se = result.version, result.mean, 0.0
    if not settings.guard:
        result.verdict = UNGUARDED
        return
    gap = math.sqrt(result.se**2 + result.best_se**2)
    worse = result.best_mean - result.mean
    result.verdict = REJECTED if promoted and worse > settings.margin_se * gap else PROMOTED


class Evaluator:
    """Aggregates held-out scores per version, publishes EvalResults, answers verdicts."""

    def __init__(self, settings: TrainerSettings, producer: Producer, metrics: Metrics):
        self.settings = settings.evaluation
        self.kafka = settings.kafka
        self.producer = producer
        self.topics = {k: settings.topics.name(k) for k in ("heldout", "scored", "evals")}
        self.heldout_ids: set[str] = set()
        self.versions: dict[int, _Version] = {}
        self.results: dict[int, m.EvalResult] = {}
        self._changed = threading.Condition()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._consumer: KafkaConsumer | None = None
        self._caught_up = threading.Event()  # read the three topics to their end once
        # Called (from this thread) with each rejected result: once published, and for
        # results read back after a restart (a rollback the crash interrupted is redone).
        self.on_rejected: Callable[[m.EvalResult], object] | None = None
        labels = ("version",)
        self.m_reward = metrics.gauge("eval_reward", "Held-out mean score per version", labels)
        self.m_se = metrics.gauge("eval_reward_se", "Standard error of eval_reward", labels)
        self.m_finished = metrics.gauge(
            "eval_finished_rate", "Held-out answers that ended, per version", labels
        )
        self.m_tokens = metrics.gauge(
            "eval_completion_tokens", "Held-out answer length (tokens), per version", labels
        )
        self.m_prompts = metrics.gauge("eval_prompts", "Held-out prompts scored", labels)
        self.m_rejected = metrics.gauge(
            "eval_rejected", "1 when the guard rejected the version, else 0", labels
        )
        self.m_label = metrics.gauge(
            "eval_label_reward", "Held-out mean score per version and label", ("version", "label")
        )
        self.m_best = metrics.gauge("eval_best_version", "Best promoted version so far")

    # ------------------------------------------------------------------ reading
    def _take(self, topic: str, raw: object) -> None:
        value, headers = raw.value, raw.headers  # type: ignore[attr-defined]
        try:
            if topic == self.topics["heldout"]:
                self.heldout_ids.add(m.validate(decode(m.Prompt, value, headers)).id)
            elif topic == self.topics["scored"]:
                self._take_scored(decode(m.ScoredGroup, value, headers))
            elif topic == self.topics["evals"]:
                result = decode(m.EvalResult, value, headers)
                self.results[result.version] = result
                self._export(result)
        except RecordError:
            return  # the dead-letter topic has it (bad held-out prompts are the sampler's)

    def _take_scored(self, scored: m.ScoredGroup) -> None:
        group = scored.group
        if group.source.topic != self.topics["heldout"] or not scored.scores:
            return
        seen = self.versions.setdefault(group.policy_version, _Version(time.monotonic()))
        seen.judge_id = scored.judge_id
        seen.prompts[group.prompt_id] = _PromptScores(
            label=group.prompt.metadata.get("label", ""),
            scores=list(scored.scores),
            finished=sum(c.finish_reason == "stop" for c in group.completions),
            tokens=[c.num_tokens for c in group.completions],
        )

    def _assign(self) -> bool:
        """Follow the three topics; a missing one counts as empty (a deployment that does
        not create `heldout` has nothing to evaluate, and a round must not wait for it)."""
        consumer = self._consumer
        assert consumer is not None
        tps = []
        for topic in self.topics.values():
            parts = consumer.partitions_for_topic(topic)
            if not parts:
                log.warning("topic %s does not exist: no held-out evaluation from it", topic)
                continue
            tps += [TopicPartition(topic, p) for p in sorted(parts)]
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        return True

    # ------------------------------------------------------------------ publishing
    def _due(self, version: int, seen: _Version) -> bool | None:
        """None: not yet; else whether the evaluation is complete."""
        if version in self.results:
            return None
        expected = len(self.heldout_ids)
        if expected and len(seen.prompts.keys() & self.heldout_ids) >= expected:
            return True
        if time.monotonic() - seen.first_seen >= self.settings.timeout_s:
            return False
        return None

    def _publish_due(self) -> None:
        for version in sorted(self.versions):
            seen = self.versions[version]
            complete = self._due(version, seen)
            if complete is None:
                continue
            result = summarize(version, seen, len(self.heldout_ids), complete)
            judge(result, [self.results[v] for v in sorted(self.results)], self.settings)
            self.producer.send_sync(self.topics["evals"], result)
            self.results[version] = result
            self._export(result)
            how = "" if complete else f" (partial: {result.prompts}/{result.expected} prompts)"
            log.info(
                "policy v%d held-out score %.3f ± %.3f over %d prompts%s: %s",
                version,
                result.mean,
                result.se,
                result.prompts,
                how,
                result.verdict,
            )
            if result.verdict == REJECTED:
                log.warning(
                    "the guard rejects policy v%d: %.3f ± %.3f is below v%d's %.3f ± %.3f by "
                    "more than %.1f standard errors",
                    version,
                    result.mean,
                    result.se,
                    result.best_version,
                    result.best_mean,
                    result.best_se,
                    self.settings.margin_se,
                )
            with self._changed:
                self._changed.notify_all()
            if result.verdict == REJECTED:
                self._notify_rejected(result)

    def _notify_rejected(self, result: m.EvalResult) -> None:
        if self.on_rejected is None:
            return
        try:
            self.on_rejected(result)
        except Exception:  # the trainer's own round guard still checks the verdict
            log.exception("acting on the rejection of policy v%d failed", result.version)

    def _export(self, result: m.EvalResult) -> None:
        v = str(result.version)
        self.m_reward.labels(v).set(result.mean)
        self.m_se.labels(v).set(result.se)
        self.m_finished.labels(v).set(result.finished_rate)
        self.m_tokens.labels(v).set(result.mean_tokens)
        self.m_prompts.labels(v).set(result.prompts)
        self.m_rejected.labels(v).set(1.0 if result.verdict == REJECTED else 0.0)
        for label in result.labels:
            self.m_label.labels(v, label.label).set(label.mean)
        promoted = [r for r in self.results.values() if r.verdict != REJECTED]
        if promoted:
            self.m_best.set(max(promoted, key=lambda r: (r.mean, r.version)).version)

    # ------------------------------------------------------------------ the guard's view
    def result(self, version: int) -> m.EvalResult | None:
        return self.results.get(version)

    def best_promoted(self) -> m.EvalResult | None:
        promoted = [r for r in self.results.values() if r.verdict != REJECTED]
        return max(promoted, key=lambda r: (r.mean, r.version)) if promoted else None

    def wait_result(
        self, version: int, timeout_s: float, stopping: Callable[[], bool] = lambda: False
    ) -> m.EvalResult | None:
        """The EvalResult of ``version``, waiting up to ``timeout_s``; None when there is no
        held-out set or it did not come in time (the caller trains unguarded then)."""
        deadline = time.monotonic() + timeout_s
        with self._changed:
            while version not in self.results and not stopping():
                if not self.heldout_ids and self._caught_up.is_set():
                    return None  # nothing is held out: no evaluation will come
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._changed.wait(min(left, 1.0))
            return self.results.get(version)

    # ------------------------------------------------------------------ thread
    def _run(self) -> None:
        self._consumer = KafkaConsumer(
            **self.kafka.client_config(), group_id=None, enable_auto_commit=False
        )
        try:
            self._assign()
            while not self._stop.is_set():
                if not self._consumer.assignment():  # none of the topics exists
                    self._caught_up.set()
                    self._stop.wait(1.0)
                    continue
                batch = self._consumer.poll(timeout_ms=500, max_records=10_000)
                for tp, records in batch.items():
                    for raw in records:
                        self._take(tp.topic, raw)
                if not self._caught_up.is_set() and self._at_end():
                    self._caught_up.set()
                    for version in sorted(self.results):  # what a restart interrupted
                        if self.results[version].verdict == REJECTED:
                            self._notify_rejected(self.results[version])
                if self._caught_up.is_set():
                    self._publish_due()
        except Exception:
            log.exception("the evaluator stopped")
            raise
        finally:
            self._consumer.close(autocommit=False)

    def _at_end(self) -> bool:
        consumer = self._consumer
        assert consumer is not None
        tps = list(consumer.assignment())
        if not tps:
            return True
        end = consumer.end_offsets(tps)
        return all(consumer.position(tp) >= end[tp] for tp in tps)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="evaluator", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def alive(self) -> bool:
        """Not dead: not started yet, or following its topics (the readiness check)."""
        return self._thread is None or self._thread.is_alive()
