"""The round protocol's shared view: the plans on the ``rounds`` topic.

The trainer announces each round as ranges of prompt-topic offsets (``RoundPlan``) and the
policy version that must sample them. Every sampler replica follows the topic from its
beginning and takes no prompt past the newest range of its partition (the *fence*), so the
replicas together sample only what the open rounds need, whatever their number, and a
restarted replica recomputes the same fence from the topic. Plans only grow: a round's
later ``seq`` extends its ranges, and round r+1 starts where round r ends.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field

from kafka import KafkaConsumer
from kafka.structs import TopicPartition

from onpolicy import messages as m
from onpolicy.serde import RecordError, decode
from onpolicy.settings import KafkaSettings

log = logging.getLogger(__name__)


@dataclass
class RoundBook:
    """The newest plan of every round, and what follows from them."""

    plans: dict[int, m.RoundPlan] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, plan: m.RoundPlan) -> bool:
        """Take ``plan`` if it is the newest of its round; True when something changed."""
        with self.lock:
            known = self.plans.get(plan.round)
            if known is not None and known.seq >= plan.seq:
                return False
            self.plans[plan.round] = plan
            return True

    def fence(self, partition: int) -> int:
        """Offsets of ``partition`` below this are planned; nothing at or past it may be
        sampled yet (0: no plan yet)."""
        with self.lock:
            return max(
                (r.end for p in self.plans.values() for r in p.ranges if r.partition == partition),
                default=0,
            )

    def covering(self, partition: int, offset: int) -> m.RoundPlan | None:
        """The plan whose ranges hold this prompt record, if any."""
        with self.lock:
            for plan in self.plans.values():
                for r in plan.ranges:
                    if r.partition == partition and r.start <= offset < r.end:
                        return plan
        return None

    def latest(self) -> m.RoundPlan | None:
        with self.lock:
            return self.plans[max(self.plans)] if self.plans else None

    def get(self, round_: int) -> m.RoundPlan | None:
        with self.lock:
            return self.plans.get(round_)


class RoundFollower:
    """Follows the (single-partition) rounds topic into a :class:`RoundBook`, in a thread."""

    def __init__(self, kafka: KafkaSettings, topic: str, book: RoundBook | None = None):
        self.kafka = kafka
        self.topic = topic
        self.book = book or RoundBook()
        self.caught_up = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def run(self) -> None:
        consumer = KafkaConsumer(
            **self.kafka.client_config(), group_id=None, enable_auto_commit=False
        )
        try:
            tp = TopicPartition(self.topic, 0)
            consumer.assign([tp])
            consumer.seek_to_beginning(tp)
            end = consumer.end_offsets([tp])[tp]
            while not self._stop.is_set():
                for records in consumer.poll(timeout_ms=200).values():
                    for raw in records:
                        try:
                            plan = m.validate(decode(m.RoundPlan, raw.value, raw.headers))
                        except RecordError as exc:  # only the trainer writes here
                            log.error("bad round plan at offset %d: %s", raw.offset, exc)
                            continue
                        if self.book.add(plan):
                            log.debug("round %d plan %d: %s", plan.round, plan.seq, plan.ranges)
                if not self.caught_up.is_set() and consumer.position(tp) >= end:
                    self.caught_up.set()
        finally:
            consumer.close(autocommit=False)
            self.caught_up.set()

    def start(self, timeout_s: float = 120.0) -> None:
        self._thread = threading.Thread(target=self.run, name="rounds", daemon=True)
        self._thread.start()
        if not self.caught_up.wait(timeout_s):
            raise TimeoutError(f"rounds topic not read within {timeout_s}s")

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
