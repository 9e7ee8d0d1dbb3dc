"""The round protocol's authority: which prompts each round trains on, and when it trains.

The trainer plans round r (its pairs train policy version r) as ranges of prompt-topic
offsets on the ``rounds`` topic, sampled by the newest published policy. Samplers take only
planned prompts (``onpolicy.rounds``), so with any number of replicas the GPUs sample what
the round needs and then stop consuming until the next policy is served. The planner follows
the round's progress in Kafka: a prompt is done when the judge scored its group (the scored
group lists the pairs it made) or when it was dead-lettered. Once every prompt of the plan is
done and its pairs are buffered, the round trains exactly those pairs.

A round adapts to the pairs prompts actually yield: while the done prompts' pairs plus the
expected yield of the pending ones fall short of ``round_size``, the plan is extended by as
many prompts as the observed yield says are missing. With ``max_staleness`` 1 the next
round is planned as soon as one is fully sampled (one-step-off: it samples while the other
trains).

Everything that decides it is in Kafka (the plans, the prompts, the scored groups, the dead
letters, the policy versions): a restarted trainer recomputes the same state.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field

from kafka import KafkaConsumer
from kafka.structs import TopicPartition

from onpolicy import messages as m
from onpolicy.bus import Producer
from onpolicy.rounds import RoundBook
from onpolicy.serde import RecordError, decode
from onpolicy.telemetry import Metrics
from onpolicy_trainer.settings import TrainerSettings

log = logging.getLogger(__name__)

EVAL_SPLIT = "eval"
PRIOR_PROMPTS = 4


@dataclass
class _Prompt:
    prompt_id: str | None  # None: undecodable or invalid (the sampler dead-letters it)
    train: bool
    first: bool  # False: the same prompt id sits at an earlier offset (a duplicate)


@dataclass
class RoundStatus:
    """Where a plan stands: prompts done or pending, and the pairs the done ones made."""

    train_prompts: int = 0
    done_train: int = 0
    pending: int = 0  # prompts of any split not yet done
    pair_ids: set[str] = field(default_factory=set)
    versions: set[int] = field(default_factory=set)

    @property
    def complete(self) -> bool:
        return self.pending == 0


class KafkaView:
    """The topics the planner reads, followed from their beginning outside any group."""

    def __init__(self, settings: TrainerSettings):
        self.topics = settings.topics
        self.consumer = KafkaConsumer(
            **settings.kafka.client_config(), group_id=None, enable_auto_commit=False
        )
        self.prompts: dict[tuple[int, int], _Prompt] = {}
        self.seen_prompt_ids: set[str] = set()
        self.high: dict[int, int] = {}  # next offset to read, per prompts partition
        self.low: dict[int, int] = {}  # first offset of each prompts partition
        # prompt id -> [(policy version, split, pair ids)] of its scored groups
        self.groups: dict[str, list[tuple[int, str, list[str]]]] = {}
        self.dead_offsets: set[tuple[int, int]] = set()
        self.dead_prompt_ids: set[str] = set()
        self.plans: list[m.RoundPlan] = []
        self._assigned = False

    def _assign(self) -> bool:
        names = {kind: self.topics.name(kind) for kind in ("prompts", "scored", "dlq", "rounds")}
        tps = []
        for topic in names.values():
            parts = self.consumer.partitions_for_topic(topic)
            if not parts:
                return False
            tps += [TopicPartition(topic, p) for p in sorted(parts)]
        self.consumer.assign(tps)
        self.consumer.seek_to_beginning(*tps)
        prompt_tps = [tp for tp in tps if tp.topic == names["prompts"]]
        for tp, offset in self.consumer.beginning_offsets(prompt_tps).items():
            self.low[tp.partition] = self.high[tp.partition] = offset
        self._assigned = True
        return True

    def caught_up(self) -> bool:
        tps = list(self.consumer.assignment())
        end = self.consumer.end_offsets(tps)
        return all(self.consumer.position(tp) >= end[tp] for tp in tps)

    def refresh(self, timeout_ms: int = 200) -> bool:
        """Read what is new; True if anything was."""
        if not self._assigned and not self._assign():
            time.sleep(timeout_ms / 1000)
            return False
        batch = self.consumer.poll(timeout_ms=timeout_ms, max_records=50_000)
        for tp, records in batch.items():
            for raw in records:
                self._take(tp, raw)
        return bool(batch)

    def _take(self, tp: TopicPartition, raw: object) -> None:
        topic = tp.topic
        value, headers = raw.value, raw.headers  # type: ignore[attr-defined]
        if topic == self.topics.name("prompts"):
            try:
                prompt = m.validate(decode(m.Prompt, value, headers))
            except RecordError:
                entry = _Prompt(None, False, True)
            else:
                first = prompt.id not in self.seen_prompt_ids
                self.seen_prompt_ids.add(prompt.id)
                entry = _Prompt(prompt.id, prompt.dataset_split != EVAL_SPLIT, first)
            self.prompts[(tp.partition, raw.offset)] = entry  # type: ignore[attr-defined]
            self.high[tp.partition] = raw.offset + 1  # type: ignore[attr-defined]
        elif topic == self.topics.name("scored"):
            try:
                scored = decode(m.ScoredGroup, value, headers)
            except RecordError:
                return
            group = scored.group
            self.groups.setdefault(group.prompt_id, []).append(
                (group.policy_version, group.prompt.dataset_split, list(scored.pair_ids))
            )
        elif topic == self.topics.name("dlq"):
            try:
                letter = decode(m.DeadLetter, value, headers)
            except RecordError:
                return
            if letter.source_topic == self.topics.name("prompts"):
                self.dead_offsets.add((letter.partition, letter.offset))
            elif letter.source_topic == self.topics.name("completions"):
                # The group's own headers say how it was encoded (protobuf by default).
                original = [(k, v.encode()) for k, v in letter.original_headers.items()]
                try:
                    group = decode(m.CompletionGroup, letter.original_value, original)
                except RecordError:
                    return
                if group.prompt_id:
                    self.dead_prompt_ids.add(group.prompt_id)
        elif topic == self.topics.name("rounds"):
            try:
                self.plans.append(m.validate(decode(m.RoundPlan, value, headers)))
            except RecordError:
                log.error("bad round plan at offset %d", raw.offset)  # type: ignore[attr-defined]

    def close(self) -> None:
        self.consumer.close(autocommit=False)


class RoundPlanner:
    """Plans, extends and closes rounds; runs in a thread beside the trainer's processor."""

    def __init__(self, settings: TrainerSettings, runner, producer: Producer, metrics: Metrics):
        self.settings = settings
        self.runner = runner
        self.producer = producer
        self.rounds_topic = settings.topics.name("rounds")
        self.book = RoundBook()
        self.view: KafkaView | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # The round handed to the runner, and its future, until it ends.
        self._training: tuple[int, Future[None]] | None = None
        self._last_progress: dict[int, tuple[tuple[int, int], float]] = {}
        self.ready = threading.Event()
        self.m_remaining = metrics.gauge(
            "round_prompts_remaining",
            "Training prompts of the open rounds not yet sampled and judged (what the "
            "samplers still have to do; KEDA scales them on it)",
        )
        self.m_round = metrics.gauge("round_open", "The newest round planned")
        self.m_planned = metrics.gauge(
            "round_planned_prompts", "Training prompts planned for the newest round"
        )
        self.m_expected = metrics.gauge(
            "round_pairs", "Pairs the newest round's judged prompts made"
        )
        self.m_plans = metrics.counter("round_plans_total", "Plans and extensions published")

    # ------------------------------------------------------------------ state
    def yield_per_prompt(self) -> float:
        """Pairs per judged training prompt so far, smoothed towards one (best vs worst
        makes at most one per prompt by default) by a prior worth ``PRIOR_PROMPTS`` prompts,
        so that the first few prompts' ties do not make the planner take the whole topic."""
        assert self.view is not None
        made = prompts = 0
        for plan in self.book.plans.values():
            status = self.status(plan)
            made += len(status.pair_ids)
            prompts += status.done_train
        return max((made + PRIOR_PROMPTS) / (prompts + PRIOR_PROMPTS), 0.05)

    def status(self, plan: m.RoundPlan) -> RoundStatus:
        assert self.view is not None
        view = self.view
        out = RoundStatus()
        for r in plan.ranges:
            for offset in range(r.start, r.end):
                entry = view.prompts.get((r.partition, offset))
                if entry is None:  # not read yet
                    out.pending += 1
                    continue
                out.train_prompts += entry.train
                if (r.partition, offset) in view.dead_offsets:
                    out.done_train += entry.train
                    continue
                if entry.prompt_id is None:
                    out.pending += 1  # invalid: done once its dead letter is in
                    continue
                if entry.prompt_id in view.dead_prompt_ids or not entry.first:
                    out.done_train += entry.train
                    continue
                groups = [
                    g
                    for g in view.groups.get(entry.prompt_id, [])
                    if not entry.train or g[0] >= plan.sample_version
                ]
                if not groups:
                    out.pending += 1
                    continue
                out.done_train += entry.train
                # Pairs of a rolled-back version are never trained: the prompt is done
                # without pairs, and the round grows by others (sampled by the restored one).
                groups = [g for g in groups if g[0] not in self.runner.rejected_versions]
                for version, _, pair_ids in groups:
                    if entry.train and pair_ids:
                        out.pair_ids.update(pair_ids)
                        out.versions.add(version)
        return out

    # ------------------------------------------------------------------ planning
    def _next_prompts(self, starts: dict[int, int], need: int) -> dict[int, int]:
        """Ends per partition so that [starts, ends) holds ``need`` more training prompts
        (or all there are), taken across partitions in turn."""
        assert self.view is not None
        view = self.view
        pos = dict(starts)
        found = 0
        while found < need:
            moved = False
            for p in sorted(pos):
                if pos[p] >= view.high.get(p, 0):
                    continue
                entry = view.prompts.get((p, pos[p]))
                pos[p] += 1
                moved = True
                if entry is not None and entry.train and entry.prompt_id and entry.first:
                    found += 1
                    if found >= need:
                        break
            if not moved:
                break
        return pos

    def _publish(self, plan: m.RoundPlan) -> None:
        m.validate(plan)
        self.producer.send_sync(self.rounds_topic, plan)
        self.book.add(plan)
        self.m_plans.inc()
        log.info(
            "round %d plan %d: %d training prompts sampled by v%d+ (%s)",
            plan.round,
            plan.seq,
            plan.train_prompts,
            plan.sample_version,
            ", ".join(f"p{r.partition}[{r.start},{r.end})" for r in plan.ranges),
        )

    def _ends_of(self, round_: int) -> dict[int, int]:
        """Where round ``round_`` ends (so its successor starts), per partition."""
        assert self.view is not None
        plan = self.book.get(round_)
        if plan is None:
            return dict(self.view.low)
        ends = dict(self.view.low)
        ends.update({r.partition: r.end for r in plan.ranges})
        return ends

    def _count_train(self, starts: dict[int, int], ends: dict[int, int]) -> int:
        assert self.view is not None
        return sum(
            1
            for p, end in ends.items()
            for o in range(starts.get(p, end), end)
            if (e := self.view.prompts.get((p, o))) is not None and e.train and e.first
        )

    def _open(self, round_: int) -> None:
        starts = self._ends_of(round_ - 1)
        need = math.ceil(self.settings.round_size / self.yield_per_prompt())
        ends = self._next_prompts(starts, need)
        if ends == starts:
            return  # no prompt published yet: plan once there is one
        self._publish(
            m.RoundPlan(
                round=round_,
                sample_version=self.runner.current,
                ranges=[m.OffsetRange(partition=p, start=starts[p], end=ends[p]) for p in ends],
                seq=0,
                train_prompts=self._count_train(starts, ends),
                created_unix_ms=int(time.time() * 1000),
            )
        )

    def _extend(self, plan: m.RoundPlan, status: RoundStatus) -> None:
        yield_ = self.yield_per_prompt()
        pending_train = status.train_prompts - status.done_train
        expected = len(status.pair_ids) + pending_train * yield_
        short = self.settings.round_size - expected
        if short <= 0:
            return
        current = {r.partition: r.end for r in plan.ranges}
        starts = {r.partition: r.start for r in plan.ranges}
        for p, low in self.view.low.items():  # type: ignore[union-attr]
            current.setdefault(p, low)
            starts.setdefault(p, low)
        # At most two rounds' worth at a time: the estimate firms up as they are judged.
        more = min(math.ceil(short / yield_), 2 * self.settings.round_size)
        ends = self._next_prompts(current, more)
        if ends == current:
            return  # nothing more published: the round waits, or times out
        self._publish(
            m.RoundPlan(
                round=plan.round,
                sample_version=plan.sample_version,
                ranges=[m.OffsetRange(partition=p, start=starts[p], end=ends[p]) for p in ends],
                seq=plan.seq + 1,
                train_prompts=self._count_train(starts, ends),
                created_unix_ms=int(time.time() * 1000),
            )
        )

    def _ready_to_train(self, plan: m.RoundPlan, status: RoundStatus) -> bool:
        if not status.complete or not status.pair_ids:
            return False
        if len(status.pair_ids) >= self.settings.round_size:
            return True
        # Short of round_size with nothing more to plan: train what there is once no
        # progress was made for round_timeout_s.
        last = self._last_progress.get(plan.round)
        mark = (len(status.pair_ids), plan.seq)
        now = time.monotonic()
        if last is None or last[0] != mark:
            self._last_progress[plan.round] = (mark, now)
            return False
        return now - last[1] >= self.settings.round_timeout_s

    def step(self) -> None:
        """One pass: open, extend or close rounds as the topics now stand."""
        current = self.runner.current
        if self._training is not None and self._training[1].done():
            # Published (current moved on), or failed: its pairs come back and it is retried.
            if current < self._training[0]:
                log.warning("round %d did not complete; it will be retried", self._training[0])
            self._training = None
        remaining = 0
        # Rounds current+1 .. current+1+max_staleness may be open at once.
        for round_ in range(current + 1, current + 2 + self.settings.max_staleness):
            if self.settings.max_version is not None and round_ > self.settings.max_version:
                break  # the run's last round is planned: leave the rest of the topic alone
            plan = self.book.get(round_)
            if plan is None:
                previous = self.book.get(round_ - 1)
                if round_ == current + 1 or (
                    previous is not None and self.status(previous).complete
                ):
                    self._open(round_)
                break  # later rounds open only once this one is fully sampled
            status = self.status(plan)
            remaining += status.train_prompts - status.done_train
            if round_ == max(self.book.plans):
                self.m_round.set(round_)
                self.m_planned.set(plan.train_prompts)
                self.m_expected.set(len(status.pair_ids))
            # Only the newest round grows: the next one starts where this one ends.
            short = not status.complete or len(status.pair_ids) < self.settings.round_size
            if short and self.book.get(round_ + 1) is None:
                self._extend(plan, status)
                plan = self.book.get(round_) or plan
                status = self.status(plan)
            if (
                round_ == current + 1
                and self._training is None
                and self._ready_to_train(plan, status)
                and self.runner.settled(status.pair_ids)
            ):
                log.info(
                    "training round %d on its %d pairs (%d prompts planned)",
                    round_,
                    len(status.pair_ids),
                    plan.train_prompts,
                )
                self._training = (round_, self.runner.train_planned_threadsafe(status.pair_ids))
            if not status.complete:
                break
        self.m_remaining.set(remaining)

    # ------------------------------------------------------------------ thread
    def run(self) -> None:
        self.view = KafkaView(self.settings)
        try:
            while not self._stop.is_set():
                self.view.refresh()
                if self.view._assigned and not self.ready.is_set() and self.view.caught_up():
                    for plan in self.view.plans:
                        self.book.add(plan)
                    self.ready.set()
                    log.info(
                        "round protocol: %d rounds planned so far, policy v%d",
                        len(self.book.plans),
                        self.runner.current,
                    )
                if self.ready.is_set():
                    try:
                        self.step()
                    except Exception:  # a planning error must not stop the trainer
                        log.exception("round planning failed; retrying")
                        time.sleep(1)
        finally:
            self.view.close()

    def start(self) -> None:
        self._thread = threading.Thread(target=self.run, name="planner", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
