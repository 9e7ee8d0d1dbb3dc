"""The stream processor: consume a topic, run a handler, produce, then commit.

Guarantees (at-least-once, nothing lost):

- Offsets are committed only up to the lowest record whose outputs are not yet acknowledged
  by the broker (acks=all), per partition, so records may finish out of order.
- Handlers run on an asyncio loop in a worker thread, up to ``concurrency`` at once. The main
  thread keeps polling while they run (partitions are paused while the window is full), so a
  handler slower than ``max.poll.interval.ms`` never makes the consumer leave its group.
- A record that cannot be decoded or is invalid goes to the dead-letter topic with the reason;
  other failures are retried with backoff, then dead-lettered (``max_attempts``); a
  :class:`TransientError` (a backend that is down, overloaded) is retried longer, up to
  ``max_transient_attempts`` failures: a record that keeps failing while the backend serves
  other records is a poison record and is dead-lettered (kind ``poison``) with the reason.
- A circuit breaker (:mod:`onpolicy.bus.breaker`) guards the backend: ``breaker_failures``
  consecutive transient failures (any record) open it, and so does one
  :class:`ConfigurationError` (the backend refuses every request: a rejected API key, a model
  that does not exist; or Kafka refuses an output topic, ``AuthorizationError``). While it
  is open, no record is attempted, none is dead-lettered or committed, consumption is paused
  and the service is not ready (``/readyz``); after a cool-down (``breaker_reset_s``,
  doubling up to ``breaker_max_reset_s`` while probes fail) one waiting record is tried as a
  probe, and its success closes the breaker and resumes consumption. Failures while the
  breaker is open, or that open it, do not count against a
  record's attempts: an outage dead-letters nothing. (A record failing while nothing else is
  in flight cannot be told from an outage: it opens the breaker and is held, not ready, until
  the backend takes it or an operator acts.)
- Duplicates (same record id, i.e. same Kafka key) seen recently are dropped and counted;
  a record fetched again while its first delivery is still being handled (the member was
  evicted and rejoined) waits for that one rather than being handled twice.
- An optional *fence* (``fence(partition) -> offset``) bounds what may be taken: a record at
  or past its partition's fence is not handled; the partition is rewound to it and paused
  until the fence moves (the round protocol's samplers take only planned prompts this way).
- On partition revoke and on stop (SIGTERM, Ctrl-C) in-flight work gets ``drain_timeout_s``
  to finish; what finished is committed, the rest is left uncommitted for the next owner
  (or, when the partition comes back to this member, still committed only once it is done).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import signal
import threading
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from google.protobuf.message import Message
from kafka import KafkaConsumer
from kafka.consumer.subscription_state import AsyncConsumerRebalanceListener
from kafka.errors import AuthorizationError, CommitFailedError, KafkaError
from kafka.structs import OffsetAndMetadata, TopicPartition

from onpolicy import ids
from onpolicy.bus import _kafka_fixes  # noqa: F401  (kafka-python's group join; see there)
from onpolicy.bus.breaker import CircuitBreaker, State
from onpolicy.bus.producer import Producer
from onpolicy.messages import DeadLetter, validate
from onpolicy.serde import RecordError, decode
from onpolicy.settings import KafkaSettings
from onpolicy.telemetry import Metrics

log = logging.getLogger(__name__)

M = TypeVar("M", bound=Message)


class TransientError(Exception):
    """A backend is unavailable or overloaded: retry the record (bounded by
    ``max_transient_attempts`` while the backend serves other records)."""


class ConfigurationError(Exception):
    """The backend refuses every request as configured (credentials, model name, URL):
    pause consumption and report not ready until a probe succeeds; never dead-letter."""


@dataclass(frozen=True)
class Record(Generic[M]):
    message: M
    topic: str
    partition: int
    offset: int
    key: bytes | None
    headers: list[tuple[str, bytes]]
    timestamp_ms: int
    attempt: int = 1


@dataclass(frozen=True)
class Output:
    topic: str
    message: Message


# Async handlers run on the processor's event loop; plain functions run in worker threads.
Handler = Callable[[Record[M]], Awaitable[Sequence[Output]] | Sequence[Output]]


@dataclass
class ProcessorConfig:
    group_id: str
    concurrency: int = 1
    max_attempts: int = 3
    # Failures of one record that look transient, counted only while the breaker is closed
    # (other records get through): the bound after which it is dead-lettered as poison.
    max_transient_attempts: int = 20
    breaker_failures: int = 5  # consecutive transient failures that open the circuit breaker
    breaker_reset_s: float = 5.0  # cool-down before the first probe
    breaker_max_reset_s: float = 30.0  # the cool-down doubles up to this while probes fail
    retry_backoff_s: float = 0.5
    max_backoff_s: float = 30.0
    drain_timeout_s: float = 30.0
    commit_interval_s: float = 0.2
    # How long a poll waits when no record is there (a record ends it at once). Short polls
    # wake this thread and kafka-python's IO thread ~70 times a second on an idle stream,
    # CPU a trainer's training steps pay for (measured on 2 cores: ~4%). It bounds how late
    # a record that finished while the stream is idle gets committed, and how long a stop
    # waits for the poll.
    poll_timeout_s: float = 1.0
    dedupe_window: int = 100_000
    auto_offset_reset: str = "earliest"


@dataclass
class _Offsets:
    """Per-partition commit positions with records finishing out of order."""

    pending: dict[TopicPartition, set[int]] = field(default_factory=dict)
    next: dict[TopicPartition, int] = field(default_factory=dict)
    committed: dict[TopicPartition, int] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self, tp: TopicPartition, offset: int) -> None:
        with self.lock:
            self.pending.setdefault(tp, set()).add(offset)
            self.next[tp] = offset + 1

    def done(self, tp: TopicPartition, offset: int) -> None:
        with self.lock:
            self.pending.get(tp, set()).discard(offset)

    def in_flight(self, tps: Sequence[TopicPartition] | None = None) -> int:
        with self.lock:
            keys = self.pending.keys() if tps is None else tps
            return sum(len(self.pending.get(tp, ())) for tp in keys)

    def to_commit(self, tps: Sequence[TopicPartition] | None = None) -> dict[TopicPartition, int]:
        with self.lock:
            out = {}
            for tp in self.next if tps is None else tps:
                if tp not in self.next:
                    continue
                pending = self.pending.get(tp)
                position = min(pending) if pending else self.next[tp]
                if self.committed.get(tp) != position:
                    out[tp] = position
            return out

    def tracked(self) -> list[TopicPartition]:
        with self.lock:
            return list(self.next.keys() | self.pending.keys())

    def forget(self, tps: Sequence[TopicPartition]) -> None:
        with self.lock:
            for tp in tps:
                self.pending.pop(tp, None)
                self.next.pop(tp, None)
                self.committed.pop(tp, None)


class _Listener(AsyncConsumerRebalanceListener):
    """Rebalance hooks; async because kafka-python 3 runs them on the loop that heartbeats.

    A sync hook that waited for in-flight records would stop heartbeats (the member is then
    evicted mid-rebalance) and may not call blocking consumer APIs such as ``commit()`` at all.
    """

    def __init__(self, processor: Processor):
        self.processor = processor

    async def on_partitions_revoked(self, revoked: Sequence[TopicPartition]) -> None:
        if revoked:  # kafka-python also calls this, empty, before the first join
            await self.processor._on_revoked(list(revoked))

    async def on_partitions_lost(self, lost: Sequence[TopicPartition]) -> None:
        # The group has already moved on: a commit would be refused, and the next owner
        # re-reads from the last commit. Outputs of in-flight records keep their keys, so
        # any duplicate they cause is dropped downstream by id.
        self.processor._on_lost(list(lost))

    async def on_partitions_assigned(self, assigned: Sequence[TopicPartition]) -> None:
        log.info("assigned %s", sorted(f"{tp.topic}[{tp.partition}]" for tp in assigned))
        self.processor._on_assigned(list(assigned))


def _pause_reason(breaker_reason: str) -> str:
    return "config" if breaker_reason == "config" else "circuit_open"


class Processor(Generic[M]):
    """Runs ``handler`` over every record of ``source``; see the module docstring."""

    def __init__(
        self,
        *,
        kafka: KafkaSettings,
        source: str,
        message_type: type[M],
        handler: Handler[M],
        config: ProcessorConfig,
        metrics: Metrics,
        dead_letter_topic: str,
        producer: Producer | None = None,
        fence: Callable[[int], int] | None = None,
        on_stop: Callable[[], None] | None = None,
    ):
        self.kafka = kafka
        self.fence = fence
        # Called on the polling thread as a stop begins, before the drain: a handler that
        # holds records for later work (the trainer's pairs waiting for a round) lets them go,
        # so the drain waits only for work that can finish.
        self.on_stop = on_stop
        self._running = 0  # handlers not returned yet (finished, failed or abandoned)
        self._running_lock = threading.Lock()
        # Partitions stopped at their fence -> the first offset not yet allowed.
        self._held: dict[TopicPartition, int] = {}
        self.source = source
        self.message_type = message_type
        self.handler = handler
        self.config = config
        self.dead_letter_topic = dead_letter_topic
        self.producer = producer or Producer(kafka, client_id=config.group_id)
        self._own_producer = producer is None
        self._offsets = _Offsets()
        self._seen: OrderedDict[str, None] = OrderedDict()
        # Record ids being handled now -> their outcome; only touched on the handler loop.
        self._handling: dict[str, asyncio.Future[bool]] = {}
        self._stop = threading.Event()
        self._slot_freed = threading.Event()  # wakes a full window's poll loop
        self._loop = asyncio.new_event_loop()
        self._loop_thread = threading.Thread(
            target=self._loop.run_forever, name=f"{config.group_id}-handlers", daemon=True
        )
        self._consumer: KafkaConsumer | None = None
        self.kafka_connected = False
        self._backend_ok = True
        self.revocations = 0
        self._circuit_was = State.CLOSED
        self.breaker = CircuitBreaker(
            config.breaker_failures,
            config.breaker_reset_s,
            config.breaker_max_reset_s,
            on_change=self._breaker_changed,
        )

        self.m_consumed = metrics.counter("records_consumed_total", "Records consumed", ("topic",))
        self.m_produced = metrics.counter("records_produced_total", "Records produced", ("topic",))
        self.m_dead = metrics.counter(
            "dead_letters_total", "Records sent to the dead-letter topic", ("topic", "kind")
        )
        self.m_dupes = metrics.counter(
            "duplicates_dropped_total", "Records dropped as duplicates by id", ("topic",)
        )
        self.m_retries = metrics.counter(
            "retries_total", "Handler retries by error kind", ("topic", "kind")
        )
        self.m_inflight = metrics.gauge("in_flight", "Records being processed", ("topic",))
        self.m_seconds = metrics.histogram(
            "handle_seconds", "Time from consume to outputs acknowledged", ("topic",)
        )
        self.m_lag = metrics.gauge(
            "consumer_lag", "Records behind the end of the partition", ("topic", "partition")
        )
        self.m_paused = metrics.gauge(
            "paused",
            "1 while consumption is paused by the backend: config (it refuses requests as "
            "configured) or circuit_open (it failed every request lately)",
            ("topic", "reason"),
        )
        self.m_circuit = metrics.gauge(
            "circuit_state", "Backend circuit breaker: 0 closed, 1 half-open, 2 open", ("topic",)
        )
        self.m_circuit_opened = metrics.counter(
            "circuit_opened_total", "Times the circuit breaker opened", ("topic", "reason")
        )
        self.m_poison = metrics.counter(
            "poison_dead_lettered_total",
            "Records dead-lettered after max_transient_attempts failures that looked transient",
            ("topic",),
        )
        # Export the labelled series at zero from the start: dashboards and alerts then see
        # "none yet" instead of "no data".
        self.m_dupes.labels(source)
        self.m_produced.labels(dead_letter_topic)
        for kind in ("decode", "invalid", "processing", "too_large", "poison"):
            self.m_dead.labels(source, kind)
        self.m_retries.labels(source, "transient")
        self.m_retries.labels(source, "configuration")
        for reason in ("config", "circuit_open"):
            self.m_paused.labels(source, reason).set(0)
            self.m_circuit_opened.labels(source, reason)
        self.m_circuit.labels(source).set(int(State.CLOSED))
        self.m_poison.labels(source)

    # ----------------------------------------------------------------- lifecycle
    @property
    def handler_loop(self) -> asyncio.AbstractEventLoop:
        """The event loop the handlers run on (running once :meth:`run` started): work that
        must not interleave with the handlers is scheduled onto it from other threads."""
        return self._loop

    def run(self, install_signal_handlers: bool = True) -> None:
        """Process until :meth:`stop` (or SIGTERM/SIGINT when installed); then drain."""
        if install_signal_handlers and threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, lambda *_: self.stop())
        self._loop_thread.start()
        consumer = self._consumer = KafkaConsumer(
            **self.kafka.client_config(),
            group_id=self.config.group_id,
            client_id=self.config.group_id,
            enable_auto_commit=False,
            auto_offset_reset=self.config.auto_offset_reset,
            max_poll_interval_ms=self.kafka.max_poll_interval_ms,
            session_timeout_ms=self.kafka.session_timeout_ms,
            heartbeat_interval_ms=self.kafka.heartbeat_interval_ms,
        )
        consumer.subscribe([self.source], listener=_Listener(self))
        log.info("consuming %s as group %s", self.source, self.config.group_id)
        last_commit = last_lag = 0.0
        try:
            while not self._stop.is_set():
                self._slot_freed.clear()
                free = self.config.concurrency - self._offsets.in_flight()
                full = free <= 0
                # An open breaker fetches nothing new either: what is in flight waits for the
                # probe, and what is behind it stays in Kafka, uncommitted.
                self._pause_if(consumer, full=full or not self.breaker.closed)
                # A full window fetches nothing (paused): poll without waiting, for the
                # group's upkeep, then sleep until a record finishes (below).
                wait_ms = 0 if full else int(self.config.poll_timeout_s * 1000)
                try:
                    batch = consumer.poll(timeout_ms=wait_ms, max_records=max(free, 1))
                except KafkaError as exc:
                    # e.g. a rebalance that failed part-way: the consumer rejoins on the next
                    # poll, so keep going rather than let the service die with work pending.
                    log.warning("poll failed, rejoining: %s", exc)
                    time.sleep(0.5)
                    continue
                self.kafka_connected = self._connected(consumer)
                for tp, records in batch.items():
                    for raw in records:
                        if self._at_fence(consumer, tp, raw.offset):
                            break  # the rest of this partition's batch is past it too
                        self._submit(tp, raw)
                now = time.monotonic()
                if now - last_commit >= self.config.commit_interval_s:
                    self._commit(consumer)
                    last_commit = now
                if now - last_lag >= 5:
                    self._update_lag(consumer)
                    last_lag = now
                if full:
                    self._slot_freed.wait(self.config.poll_timeout_s)
        finally:
            self._shutdown(consumer)

    def stop(self) -> None:
        self._stop.set()
        self._slot_freed.set()

    def stopping(self) -> bool:
        """Whether :meth:`stop` was called (long handlers may ask, to cut work short)."""
        return self._stop.is_set()

    @staticmethod
    def _connected(consumer: KafkaConsumer) -> bool:
        # The group coordinator being known means the broker answered group requests lately;
        # the bootstrap connection alone closes once metadata is in, so it says nothing.
        try:
            return not consumer._coordinator.coordinator_unknown()
        except AttributeError:  # another kafka-python layout: fall back to the public probe
            return consumer.bootstrap_connected()

    @property
    def backend_ok(self) -> bool:
        """The backend answered lately and the circuit breaker is closed (not paused)."""
        return self._backend_ok and self.breaker.closed

    @backend_ok.setter
    def backend_ok(self, value: bool) -> None:
        self._backend_ok = value

    @property
    def paused_reason(self) -> str | None:
        """Why consumption is paused by the backend (config, circuit_open), or None."""
        return None if self.breaker.closed else _pause_reason(self.breaker.reason)

    @property
    def ready(self) -> bool:
        return self.kafka_connected and self.backend_ok

    def _shutdown(self, consumer: KafkaConsumer) -> None:
        log.info("stopping: draining %d in-flight records", self._offsets.in_flight())
        if self.on_stop is not None:
            try:
                self.on_stop()
            except Exception:  # the drain and the commit must happen all the same
                log.exception("on_stop failed")
        self._drain()
        self._commit(consumer)
        consumer.close(autocommit=False)
        for task in asyncio.all_tasks(self._loop):
            self._loop.call_soon_threadsafe(task.cancel)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._loop_thread.join(timeout=5)
        if self._own_producer:
            self.producer.flush(10)
            self.producer.close()
        log.info("stopped")

    # ----------------------------------------------------------------- polling side
    def _pause_if(self, consumer: KafkaConsumer, full: bool) -> None:
        assigned = consumer.assignment()
        paused = consumer.paused()
        if self._held:  # a fence that moved releases its partition
            assert self.fence is not None
            self._held = {
                tp: off
                for tp, off in self._held.items()
                if tp in assigned and self.fence(tp.partition) <= off
            }
        wanted = set(assigned) if full else set(self._held)
        if todo := [tp for tp in assigned if tp in wanted and tp not in paused]:
            consumer.pause(*todo)
        if back := [tp for tp in paused if tp not in wanted]:
            consumer.resume(*back)

    def _at_fence(self, consumer: KafkaConsumer, tp: TopicPartition, offset: int) -> bool:
        """Whether ``offset`` is past the fence; if so, rewind the partition and hold it."""
        if self.fence is None or offset < self.fence(tp.partition):
            return False
        consumer.seek(tp, offset)  # fetched again once the fence moves past it
        consumer.pause(tp)
        self._held[tp] = offset
        return True

    def _submit(self, tp: TopicPartition, raw: object) -> None:
        self._offsets.start(tp, raw.offset)  # type: ignore[attr-defined]
        with self._running_lock:
            self._running += 1
        self.m_consumed.labels(self.source).inc()
        self.m_inflight.labels(self.source).inc()
        future = asyncio.run_coroutine_threadsafe(self._process(raw), self._loop)
        future.add_done_callback(lambda f, tp=tp, off=raw.offset: self._finished(f, tp, off))  # type: ignore[attr-defined]

    def _finished(self, future: Future[bool], tp: TopicPartition, offset: int) -> None:
        self.m_inflight.labels(self.source).dec()
        with self._running_lock:
            self._running -= 1
        # Only records whose outputs are safely produced count as done; an abandoned one
        # (cancelled at shutdown) stays pending, so its offset is never committed.
        if not future.cancelled() and future.exception() is None and future.result():
            self._offsets.done(tp, offset)
        self._slot_freed.set()

    def _commit(self, consumer: KafkaConsumer, tps: Sequence[TopicPartition] | None = None) -> None:
        positions = self._offsets.to_commit(tps)
        if not positions:
            return
        try:
            consumer.commit({tp: OffsetAndMetadata(pos, "", -1) for tp, pos in positions.items()})
            with self._offsets.lock:
                self._offsets.committed.update(positions)
        except (CommitFailedError, KafkaError) as exc:
            log.warning("commit failed (records will be redelivered): %s", exc)

    def _drain(self) -> None:
        # Waits for the handlers still running; one that returned without finishing its
        # record (abandoned at stop) leaves the record pending: uncommitted, redelivered.
        deadline = time.monotonic() + self.config.drain_timeout_s
        while self._running > 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        if left := self._offsets.in_flight():
            log.warning("%d records unfinished after drain; they will be redelivered", left)

    async def _on_revoked(self, revoked: list[TopicPartition]) -> None:
        # Runs on kafka-python's IO loop, so it waits and commits with that loop's own
        # awaitables (keeping heartbeats going) rather than time.sleep or consumer.commit.
        if not self._stop.is_set():  # leaving the group at shutdown is no rebalance
            self.revocations += 1
        coordinator = getattr(self._consumer, "_coordinator", None)
        if coordinator is not None:
            # At stop the drain has already waited for the running handlers: what is still
            # pending then was let go (on_stop) or cut short and will not finish, so waiting
            # for it here would only hold the close for the whole drain timeout.
            deadline = time.monotonic() + self.config.drain_timeout_s
            while (
                not self._stop.is_set()
                and self._offsets.in_flight(revoked)
                and time.monotonic() < deadline
            ):
                await coordinator._net.sleep(0.05)
            if left := self._offsets.in_flight(revoked):
                log.warning("%d records unfinished at revoke (redone if the partition moves)", left)
            positions = self._offsets.to_commit(revoked)
            if positions:
                offsets = {tp: OffsetAndMetadata(pos, "", -1) for tp, pos in positions.items()}
                try:
                    await coordinator._commit_offsets_sync_async(offsets)
                except KafkaError as exc:
                    log.warning("commit at revoke failed (records will be redelivered): %s", exc)
        # Forgotten only once the new assignment is known: a partition this member gets back
        # keeps its fetch position (kafka-python keeps retained partitions' state), so its
        # unfinished records are not fetched again and must stay pending here, or a later
        # commit would pass them.

    def _on_assigned(self, assigned: list[TopicPartition]) -> None:
        gone = set(self._offsets.tracked()) - set(assigned)
        self._offsets.forget(list(gone))

    def _on_lost(self, lost: list[TopicPartition]) -> None:
        if not self._stop.is_set():
            self.revocations += 1
        log.warning("lost %d partitions (evicted from the group); not committing", len(lost))
        self._offsets.forget(lost)

    def _update_lag(self, consumer: KafkaConsumer) -> None:
        for tp in consumer.assignment():
            high = consumer.highwater(tp)
            if high is None:
                continue
            try:
                position = consumer.position(tp, timeout_ms=1000)
            except KafkaError:
                continue
            if position is not None:
                self.m_lag.labels(tp.topic, str(tp.partition)).set(max(high - position, 0))

    # ----------------------------------------------------------------- handler side
    async def _process(self, raw: object) -> bool:
        """Handle one record; True once its outputs (or its dead letter) are acknowledged."""
        started = time.monotonic()
        topic, partition, offset = raw.topic, raw.partition, raw.offset  # type: ignore[attr-defined]
        try:
            message = validate(decode(self.message_type, raw.value, raw.headers))  # type: ignore[attr-defined]
        except RecordError as exc:
            return await self._dead_letter(raw, exc.kind, str(exc), attempts=1)

        record_key = message.id  # type: ignore[attr-defined]
        first = self._handling.get(record_key)
        if first is not None or record_key in self._seen:
            self.m_dupes.labels(topic).inc()
            log.debug("dropping duplicate %s at %s[%d]@%d", record_key, topic, partition, offset)
            if first is None:
                return True
            # A copy of a record still being handled (e.g. this member was evicted, rejoined
            # and re-read the partition from the last commit; it may be the very same offset):
            # its handler must not run twice, and its offset counts as done only once the
            # first's outputs are acknowledged. Abandoned (shutdown): leave it pending too.
            return await asyncio.shield(first)

        outcome = self._handling[record_key] = self._loop.create_future()
        ok = False
        try:
            ok = await self._handle(raw, message, record_key)
        finally:
            del self._handling[record_key]
            outcome.set_result(ok)
        if ok:
            self.m_seconds.labels(topic).observe(time.monotonic() - started)
        return ok

    async def _handle(self, raw: object, message: M, record_key: str) -> bool:
        """Run the handler with retries; True once its outputs (or dead letter) are acked."""
        topic, partition, offset = raw.topic, raw.partition, raw.offset  # type: ignore[attr-defined]
        attempt = failures = transient_failures = 0  # failures: counted ones (breaker closed)
        backoff = self.config.retry_backoff_s
        while True:
            granted = await self._permit()
            if granted is None:
                return False  # stopping while the breaker holds it: leave it uncommitted
            probe = granted is State.HALF_OPEN
            attempt += 1
            record = Record(
                message,
                topic,
                partition,
                offset,
                raw.key,
                list(raw.headers or []),  # type: ignore[attr-defined]
                raw.timestamp,
                attempt,  # type: ignore[attr-defined]
            )
            try:
                if inspect.iscoroutinefunction(self.handler):
                    outputs = await self.handler(record)
                else:  # blocking code must not stall the other records' handlers
                    outputs = await asyncio.to_thread(self.handler, record)
                await asyncio.gather(
                    *(self.producer.send_async(out.topic, out.message) for out in outputs)
                )
                for out in outputs:
                    self.m_produced.labels(out.topic).inc()
                break
            except RecordError as exc:
                self.breaker.success()  # the backend answered; this record is at fault
                return await self._dead_letter(raw, exc.kind, str(exc), attempt)
            except asyncio.CancelledError:
                if probe:
                    self.breaker.release()
                raise
            except (ConfigurationError, AuthorizationError) as exc:
                # Every record would fail alike: hold this one (not counted, not dead-lettered)
                # and pause until a probe gets through. Kafka refusing an output topic (the
                # service's ACLs lack it) is such an error too, not this record's fault.
                self.m_retries.labels(topic, "configuration").inc()
                self.breaker.trip("config", str(exc))
                if self._stop.is_set():
                    return False
                continue
            except Exception as exc:
                transient = isinstance(exc, TransientError | ConnectionError | TimeoutError)
                kind = "transient" if transient else type(exc).__name__
                self.m_retries.labels(topic, kind).inc()
                if transient:
                    self.backend_ok = False
                closed_before = self.breaker.closed and not probe
                # The breaker counts what says the backend is down or overloaded; other errors
                # (a bad request, a bug, a failed training round) are this record's: the
                # backend answered. They are retried and bounded by max_attempts as before.
                opened = False
                if transient:
                    opened = self.breaker.failure(f"{type(exc).__name__}: {exc}")
                else:
                    self.breaker.success()
                # Counted against this record only while others get through: a failure that
                # opens the breaker, or a probe's, is the backend's, not the record's.
                if closed_before and not opened:
                    failures += 1
                    transient_failures += transient
                    if transient and transient_failures >= self.config.max_transient_attempts:
                        self.m_poison.labels(topic).inc()
                        reason = (
                            f"poison record: {transient_failures} failures that looked "
                            f"transient while the backend served other records "
                            f"(max_transient_attempts={self.config.max_transient_attempts}); "
                            f"last: {exc!r}"
                        )
                        log.error("giving up on %s: %s", record_key, reason)
                        return await self._dead_letter(raw, "poison", reason, attempt)
                    if not transient and failures - transient_failures >= self.config.max_attempts:
                        log.exception("giving up on %s after %d attempts", record_key, attempt)
                        return await self._dead_letter(raw, "processing", repr(exc), attempt)
                if self._stop.is_set():
                    return False  # leave it uncommitted for the next owner
                if not self.breaker.closed:
                    continue  # the breaker's cool-down paces the next try
                log.warning(
                    "attempt %d for %s failed (%s); retrying in %.1fs",
                    attempt,
                    record_key,
                    exc,
                    backoff,
                )
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self.config.max_backoff_s)
        self.breaker.success()
        self.backend_ok = True
        self._remember(record_key)
        return True

    async def _permit(self) -> State | None:
        """Wait for the breaker to let an attempt through: CLOSED (a normal attempt),
        HALF_OPEN (this attempt is the probe), or None when stopping meanwhile."""
        while True:
            granted = self.breaker.permit()
            if granted is not None:
                return granted
            if self._stop.is_set():
                return None
            due = self.breaker.retry_in()  # 0 while another record is the probe
            await asyncio.sleep(min(due, 0.5) if due > 0 else 0.2)

    def _breaker_changed(self, state: State, reason: str) -> None:
        # Called by the breaker under its lock: only reads its plain attributes.
        was, self._circuit_was = self._circuit_was, state
        source, breaker = self.source, self.breaker
        self.m_circuit.labels(source).set(int(state))
        paused = None if state is State.CLOSED else _pause_reason(reason)
        for name in ("config", "circuit_open"):
            self.m_paused.labels(source, name).set(1 if name == paused else 0)
        if state is State.OPEN and was is State.CLOSED:
            self.m_circuit_opened.labels(source, paused).inc()
            if paused == "config":
                log.error(
                    "%s: the backend refuses requests as configured (configuration or "
                    "authorization error): %s. Consumption paused, service not ready, "
                    "nothing dead-lettered; a record is retried as a probe in %.0fs (then less "
                    "often) and consumption resumes when one succeeds. Fix the setting (API "
                    "key, model name, URL) or restart the service with a corrected one.",
                    source,
                    breaker.last_error,
                    breaker.cooldown_s,
                )
            else:
                log.error(
                    "%s: circuit breaker open after %d consecutive failures (last: %s). "
                    "Consumption paused, service not ready, nothing dead-lettered; probing "
                    "the backend with one record in %.0fs.",
                    source,
                    breaker.failure_threshold,
                    breaker.last_error,
                    breaker.cooldown_s,
                )
        elif state is State.OPEN:  # a probe failed
            log.warning(
                "%s: probe failed (%s); backend still paused (%s), next probe in %.0fs",
                source,
                breaker.last_error,
                paused,
                breaker.cooldown_s,
            )
        elif state is State.HALF_OPEN:
            log.info("%s: probing the backend with one record", source)
        elif was is not State.CLOSED:
            log.warning("%s: the backend answered the probe; consumption resumes", source)

    def _remember(self, key: str) -> None:
        self._seen[key] = None
        if len(self._seen) > self.config.dedupe_window:
            self._seen.popitem(last=False)

    async def _dead_letter(self, raw: object, kind: str, reason: str, attempts: int) -> bool:
        topic, partition, offset = raw.topic, raw.partition, raw.offset  # type: ignore[attr-defined]
        letter = DeadLetter(
            id=ids.dead_letter_id(topic, partition, offset),
            source_topic=topic,
            partition=partition,
            offset=offset,
            error_kind=kind,
            error_message=reason,
            attempts=attempts,
            original_key=raw.key or b"",  # type: ignore[attr-defined]
            original_value=raw.value or b"",  # type: ignore[attr-defined]
            original_headers={
                k: (v or b"").decode("utf-8", "replace")
                for k, v in raw.headers or []  # type: ignore[attr-defined]
            },
            consumer_group=self.config.group_id,
            failed_unix_ms=int(time.time() * 1000),
        )
        log.warning("dead-lettering %s[%d]@%d (%s): %s", topic, partition, offset, kind, reason)
        backoff = self.config.retry_backoff_s
        while True:
            try:
                await self.producer.send_async(self.dead_letter_topic, letter)
                break
            except KafkaError as exc:  # the broker is down: keep the record pending meanwhile
                if self._stop.is_set():
                    return False
                log.warning("dead letter not produced (%s); retrying in %.1fs", exc, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self.config.max_backoff_s)
        self.m_dead.labels(topic, kind).inc()
        self.m_produced.labels(self.dead_letter_topic).inc()
        return True
