"""Policy tracking: follow the policy topic and keep vLLM serving the newest adapter.

Every replica reads the whole (single-partition) policy topic outside any consumer group, so
all replicas converge on the same, newest policy. On start the topic is read to its end and
the newest adapter loaded before any prompt is taken.

A policy is activated only once vLLM is proven to serve it (``served.ServedModels.ensure``):
its name is ``<prefix>-v<N>-<content digest>`` and ``/v1/models`` must list that name with the
adapter's path as ``root``. The worker requests ``current.model``, so a group's
``policy_version`` is the version of the adapter vLLM actually used.

Failures never block the topic: a transient one (adapter not fetchable yet, vLLM down) is
retried with backoff, the topic still read between attempts, and a newer version replaces the
pending one; a permanent one (a full checkpoint, LoRA rank above the server's maximum, another
base model, vLLM refusing the adapter) is given up at once. Either way the replica is not
ready (``ready``), the failure counted (``policy_load_failures_total{reason}``) and logged,
until a version loads.

``handoff="merged"`` (see ``weights``): vLLM serves one model whose weights are replaced in
place by each policy's full model folder (``PolicyUpdate.checkpoint_uri``). The reload runs
inside the worker's ``WeightGate`` (requests drained, none started meanwhile) and is proven by
vLLM's weight label; the current policy changes only once the label is read back. A failed
reload marks the weights unknown and restores the previous policy's weights if it can; until
some weights are proven the gate stays closed, so no group is ever stamped with a policy that
did not produce it. A label that drifts (vLLM restarted with its start-up weights) is noticed
by the worker and the tracker reloads the current policy.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx
from kafka import KafkaConsumer
from kafka.structs import TopicPartition

from onpolicy import messages as m
from onpolicy.bus import Producer
from onpolicy.messages import DeadLetter
from onpolicy.serde import RecordError, decode
from onpolicy.settings import KafkaSettings
from onpolicy.telemetry import Metrics
from onpolicy_sampler.adapters import (
    Backoff,
    LoadFailure,
    adapter_config,
    adapter_name,
    check_rank,
    content_digest,
    fetch_adapter,
    permanent,
    same_base_model,
    uri_allowed,
)
from onpolicy_sampler.served import ServedModels
from onpolicy_sampler.weights import (
    BASE_LABEL,
    UNKNOWN,
    VLLM_DEFAULT,
    ServedWeights,
    WeightGate,
    weights_label,
)

log = logging.getLogger(__name__)

FAILURE_REASONS = (
    "fetch",
    "vllm_unavailable",
    "vllm_refused",
    "verify",
    "unload",
    "rank",
    "base_model",
    "full_checkpoint",
    "uri_not_allowed",
    "bad_adapter",
    "error",
    "reload",
    "no_dev_mode",
    "no_weights",
    "drain",
)


@dataclass(frozen=True)
class Policy:
    version: int
    model: str  # the name to request from vLLM: the base model or the adapter
    adapter_path: str | None = None  # LoRA: the adapter folder; merged: the model folder
    label: str | None = None  # merged: vLLM's weight label (None: the base model's)

    def proven_by(self, label: str) -> bool:
        """Whether vLLM's weight label says it serves this policy's weights."""
        if self.label is None:
            return label in (VLLM_DEFAULT, BASE_LABEL)
        return label == self.label


@dataclass(frozen=True)
class PolicyFailure:
    """Why the newest published policy is not the one being sampled."""

    version: int
    reason: str
    message: str
    permanent: bool
    attempts: int


class PolicyTracker:
    def __init__(
        self,
        *,
        kafka: KafkaSettings,
        topic: str,
        dead_letter_topic: str,
        vllm_url: str,
        base_model: str,
        keep_adapters: int,
        cache_dir: Path,
        metrics: Metrics,
        producer: Producer,
        api_key: str | None = None,
        adapter_prefix: str = "policy",
        max_lora_rank: int = 16,
        adapter_uri_prefixes: Sequence[str] = (),
        retry_initial_s: float = 0.5,
        retry_max_s: float = 15.0,
        handoff: str = "lora",
        drain_timeout_s: float = 600.0,
    ):
        self.handoff = handoff
        self.drain_timeout_s = drain_timeout_s
        self.kafka = kafka
        self.topic = topic
        self.dead_letter_topic = dead_letter_topic
        self.base = Policy(0, base_model)
        self.current = self.base
        self.keep_adapters = keep_adapters
        self.adapter_prefix = adapter_prefix
        self.max_lora_rank = max_lora_rank
        self.adapter_uri_prefixes = tuple(adapter_uri_prefixes)
        if not self.adapter_uri_prefixes:
            log.warning(
                "adapter_uri_prefixes is empty: adapters are loaded from any URI a policy "
                "update names; set it to the checkpoint store (e.g. /checkpoints/ or s3://...)"
            )
        self.cache_dir = cache_dir
        self.producer = producer
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(base_url=vllm_url, headers=headers, timeout=60)
        self.served = ServedModels(self.http)
        self.weights = ServedWeights(self.http)
        self.gate = WeightGate()  # merged: the worker's requests versus reloads
        self._check_label = threading.Event()  # the worker saw a label other than current's
        self.weights_failure: str | None = None  # the last weight check or restore failed
        self._next_check = 0.0
        self._vllm_lock = threading.Lock()  # the policy thread and the worker's reloads
        self.loaded: list[Policy] = []
        self.failure: PolicyFailure | None = None
        self._pending: m.PolicyUpdate | None = None
        self._backoff = Backoff(retry_initial_s, retry_max_s)
        self._next_attempt = 0.0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.caught_up = threading.Event()
        self.m_version = metrics.gauge("policy_version", "Policy version being sampled")
        self.m_loads = metrics.counter("adapter_loads_total", "Adapters loaded into vLLM")
        self.m_load_seconds = metrics.histogram("adapter_load_seconds", "Adapter fetch + load")
        self.m_failures = metrics.counter(
            "policy_load_failures_total",
            "Failed attempts to make a policy ready, by reason",
            ("reason",),
        )
        self.m_failed = metrics.gauge(
            "policy_load_failed", "1 while the newest published policy could not be activated"
        )
        self.m_reloads = metrics.counter(
            "weight_reloads_total", "Policies reloaded into vLLM's weights (handoff=merged)"
        )
        self.m_reload_seconds = metrics.histogram(
            "weight_reload_seconds", "Drain + reload + prefix-cache reset + label check"
        )
        for reason in FAILURE_REASONS:
            self.m_failures.labels(reason)

    def ready(self) -> bool:
        """Caught up with the topic and serving its newest policy (the readiness check)."""
        alive = self._thread is None or self._thread.is_alive()
        return (
            alive
            and self.caught_up.is_set()
            and self.failure is None
            and self.weights_failure is None
            and not self.gate.closed
        )

    # ------------------------------------------------------------------ one policy
    def _prepare_weights(self, update: m.PolicyUpdate) -> Policy:
        """merged: the policy's full model folder, fetched to local disk when remote."""
        uri = update.checkpoint_uri
        if not uri:
            raise permanent(
                "no_weights",
                f"policy v{update.version} has no checkpoint_uri (merged weights): the trainer "
                "runs handoff=lora while this sampler runs handoff=merged; set ONPOLICY_HANDOFF "
                "for both",
            )
        if self.adapter_uri_prefixes and not uri_allowed(uri, self.adapter_uri_prefixes):
            raise permanent(
                "uri_not_allowed",
                f"policy v{update.version} names {uri!r}, outside the checkpoint store this "
                f"sampler loads from (adapter_uri_prefixes {list(self.adapter_uri_prefixes)})",
            )
        path = fetch_adapter(uri, self.cache_dir, marker="config.json")
        label = weights_label(update.version, uri, update.created_unix_ms, self.adapter_prefix)
        return Policy(update.version, self.base.model, str(path), label)

    def _reload(self, policy: Policy) -> None:
        """merged: drain the worker's requests, reload ``policy``'s weights, prove them.

        On failure vLLM's weights are unknown (labelled so): the previous policy's weights are
        reloaded if possible; if that fails too the gate stays closed (nothing is sampled)
        until some version reloads.
        """
        with self._vllm_lock:
            if not self.gate.close(self.drain_timeout_s):
                self.gate.open()
                raise LoadFailure(
                    "drain",
                    f"requests still in flight after {self.drain_timeout_s}s",
                    permanent=False,
                )
            previous = self.current
            if self.weights.label() == policy.label:  # e.g. this sampler restarted, vLLM not
                with self._lock:
                    self.current = policy
                self.weights_failure = None
                self.gate.open()
                return
            try:
                self.weights.reload(
                    policy.adapter_path or self._base_root(), policy.label or BASE_LABEL
                )
            except LoadFailure:
                if previous is not policy and self._restore(previous):
                    self.gate.open()
                raise
            with self._lock:
                self.current = policy
            self.weights_failure = None
            self.gate.open()

    def _base_root(self) -> str:
        """The folder vLLM loaded at start (``/v1/models`` root): the base model's weights."""
        root = (self.served.models().get(self.base.model) or {}).get("root")
        if not root:
            raise permanent("base_model", f"vLLM's /v1/models does not list {self.base.model}")
        return root

    def _restore(self, policy: Policy) -> bool:
        try:
            self.weights.reload(
                policy.adapter_path or self._base_root(), policy.label or BASE_LABEL
            )
        except LoadFailure as exc:
            log.error(
                "restoring v%d's weights failed too (%s): vLLM's weights are UNKNOWN; this "
                "replica samples nothing until a version reloads",
                policy.version,
                exc,
            )
            return False
        log.warning("restored v%d's weights after a failed reload", policy.version)
        return True

    def _reconcile(self) -> None:
        """vLLM's weight label against the current policy; reload the current policy's
        weights when they differ (vLLM restarted, another run reloaded it). In lora mode only
        the base weights are checked, and only where vLLM has dev mode."""
        try:
            label = self.weights.label()
        except LoadFailure as exc:
            if self.handoff == "lora" and exc.reason == "no_dev_mode":
                return
            raise
        policy = self.current if self.handoff == "merged" else self.base
        if policy.proven_by(label):
            if self.gate.closed and label != UNKNOWN:
                self.gate.open()
            return
        log.warning(
            "vLLM's weights are labelled %r, not v%d's (%s): reloading them",
            label,
            policy.version,
            policy.label or BASE_LABEL,
        )
        started = time.monotonic()
        with self._vllm_lock:
            if self.handoff == "merged" and not self.gate.close(self.drain_timeout_s):
                self.gate.open()
                raise LoadFailure("drain", "requests still in flight", permanent=False)
            self.weights.reload(
                policy.adapter_path or self._base_root(), policy.label or BASE_LABEL
            )
            self.gate.open()
        self.m_reloads.inc()
        self.m_reload_seconds.observe(time.monotonic() - started)

    def _check_weights(self) -> None:
        """``_reconcile``, its failure counted, logged and kept as not ready (never raised)."""
        self._check_label.clear()
        self._next_check = time.monotonic() + 5.0
        try:
            self._reconcile()
        except LoadFailure as exc:
            self.m_failures.labels(exc.reason).inc()
            if self.handoff == "lora":  # a courtesy check there: adapters are proven anyway
                log.warning("checking vLLM's base weights failed: %s: %s", exc.reason, exc)
                return
            self.weights_failure = f"{exc.reason}: {exc}"
            log.error("checking vLLM's weights failed (NOT READY): %s: %s", exc.reason, exc)
            return
        self.weights_failure = None

    def notice_label(self, label: str) -> None:
        """The worker saw vLLM report ``label`` where it expected the current policy's."""
        if not self.current.proven_by(label):
            self._check_label.set()

    def _prepare(self, update: m.PolicyUpdate) -> Policy:
        """Fetch and check the adapter on this side; its content names it in vLLM."""
        if self.handoff == "merged":
            return self._prepare_weights(update)
        if not update.adapter_uri:
            raise permanent(
                "full_checkpoint",
                f"policy v{update.version} is a full checkpoint ({update.checkpoint_uri}), "
                "which the sampler cannot hot-load (vLLM's runtime API loads LoRA adapters "
                "only): train LoRA adapters, or reload full weights some other way",
            )
        if self.adapter_uri_prefixes and not uri_allowed(
            update.adapter_uri, self.adapter_uri_prefixes
        ):
            raise permanent(
                "uri_not_allowed",
                f"policy v{update.version} names {update.adapter_uri!r}, outside the checkpoint "
                "store this sampler loads from (adapter_uri_prefixes "
                f"{list(self.adapter_uri_prefixes)})",
            )
        path = fetch_adapter(update.adapter_uri, self.cache_dir)
        check_rank(adapter_config(path), self.max_lora_rank, str(path))
        digest = content_digest(path)
        name = adapter_name(update.version, digest, self.adapter_prefix)
        return Policy(update.version, name, str(path))

    def _check_base_model(self, update: m.PolicyUpdate) -> None:
        models = self.served.models()
        base = models.get(self.base.model)
        served = {self.base.model, (base or {}).get("root") or ""}
        if not same_base_model(update.base_model, served):
            raise permanent(
                "base_model",
                f"policy v{update.version} was trained on {update.base_model!r}, but vLLM "
                f"serves {self.base.model!r} from {(base or {}).get('root')!r}",
            )

    def _activate(self, update: m.PolicyUpdate) -> None:
        started = time.monotonic()
        policy = self._prepare(update)
        if self.handoff == "merged":
            with self._vllm_lock:
                self._check_base_model(update)
            self._reload(policy)
            seconds = time.monotonic() - started
            self.m_version.set(policy.version)
            self.m_reloads.inc()
            self.m_reload_seconds.observe(seconds)
            log.info(
                "now sampling policy v%d: weights reloaded from %s, vLLM reports %s (%.2fs)",
                policy.version,
                policy.adapter_path,
                policy.label,
                seconds,
            )
            return
        with self._vllm_lock:
            self._check_base_model(update)
            action = self.served.ensure(policy.model, policy.adapter_path or "")
        with self._lock:
            self.current = policy
            self.loaded = [p for p in self.loaded if p.model != policy.model] + [policy]
            stale, self.loaded = (
                self.loaded[: -self.keep_adapters],
                self.loaded[-self.keep_adapters :],
            )
        for old in stale:
            try:
                with self._vllm_lock:
                    self.served.unload(old.model)
            except LoadFailure as exc:
                log.warning("unloading %s failed: %s", old.model, exc)
        seconds = time.monotonic() - started
        self.m_version.set(policy.version)
        self.m_loads.inc()
        self.m_load_seconds.observe(seconds)
        log.info(
            "now sampling policy v%d as %s (%s from %s, checked in vLLM's /v1/models, %.2fs)",
            policy.version,
            policy.model,
            action,
            policy.adapter_path,
            seconds,
        )

    def _attempt(self) -> None:
        update = self._pending
        assert update is not None
        try:
            self._activate(update)
        except LoadFailure as exc:
            self._failed(update, exc)
            return
        except Exception as exc:  # a bug or an unforeseen error: loud, and retried
            log.exception("activating policy v%d failed unexpectedly", update.version)
            self._failed(update, LoadFailure("error", repr(exc), permanent=False))
            return
        self._pending = None
        self.failure = None
        self._backoff.reset()
        self.m_failed.set(0)

    def _failed(self, update: m.PolicyUpdate, exc: LoadFailure) -> None:
        self.m_failures.labels(exc.reason).inc()
        self.m_failed.set(1)
        attempts = self._backoff.attempts + 1
        self.failure = PolicyFailure(update.version, exc.reason, str(exc), exc.permanent, attempts)
        if exc.permanent:
            log.error(
                "policy v%d refused (%s): %s. This replica is NOT READY and samples v%d "
                "until a later version loads",
                update.version,
                exc.reason,
                exc,
                self.current.version,
            )
            self._pending = None
            self._backoff.reset()
            return
        delay = self._backoff.next_delay()
        self._next_attempt = time.monotonic() + delay
        log.warning(
            "policy v%d not active yet (%s: %s); attempt %d failed, retrying in %.1fs "
            "(NOT READY meanwhile, still sampling v%d)",
            update.version,
            exc.reason,
            exc,
            attempts,
            delay,
            self.current.version,
        )

    def reload_current(self) -> None:
        """vLLM does not know the current adapter (it restarted): load it again.

        Called by the worker when a request names an unknown model. One bounded pass (look,
        load, verify); the worker's request is retried by the processor, with backoff, and
        comes back here if the adapter is still missing.
        """
        with self._lock:
            policy = self.current
        if policy.adapter_path is None:
            return
        try:
            with self._vllm_lock:
                action = self.served.ensure(policy.model, policy.adapter_path)
        except LoadFailure as exc:
            self.m_failures.labels(exc.reason).inc()
            log.warning("reloading %s into vLLM failed (%s): %s", policy.model, exc.reason, exc)
            return
        if action != "verified":
            log.info("reloaded %s into vLLM (%s)", policy.model, action)

    # ------------------------------------------------------------------ Kafka side
    def _handle(self, raw) -> None:
        try:
            update = m.validate(decode(m.PolicyUpdate, raw.value, raw.headers))
        except RecordError as exc:
            log.error("bad policy record at offset %d: %s", raw.offset, exc)
            letter = DeadLetter(
                source_topic=raw.topic,
                partition=raw.partition,
                offset=raw.offset,
                error_kind=exc.kind,
                error_message=str(exc),
                attempts=1,
                original_value=raw.value or b"",
                consumer_group="sampler-policy",
            )
            self.producer.send_sync(self.dead_letter_topic, m.validate(letter))
            return
        if update.version <= self.current.version:
            return  # replayed or out of date: the newest policy wins
        if self._pending is not None and update.version < self._pending.version:
            return
        if self._pending is None or update.version > self._pending.version:
            self._backoff.reset()  # a newer version replaces the pending one: try it now
            self._next_attempt = 0.0
        self._pending = update

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
                wait_ms = 500
                if self._pending is not None:
                    wait_ms = int(min(max(self._next_attempt - time.monotonic(), 0) * 1000, 500))
                for records in consumer.poll(timeout_ms=wait_ms).values():
                    for raw in records:
                        self._handle(raw)
                at_end = consumer.position(tp) >= end
                # While catching up, only the newest update counts: load nothing before the end.
                if (
                    self._pending is not None
                    and (at_end or self.caught_up.is_set())
                    and time.monotonic() >= self._next_attempt
                ):
                    self._attempt()
                if not self.caught_up.is_set() and at_end and self._pending is None:
                    self._check_weights()  # vLLM may hold another run's weights
                    self.caught_up.set()
                    log.info("policy topic read to its end: sampling v%d", self.current.version)
                elif (
                    self.handoff == "merged"
                    and self.caught_up.is_set()
                    and self._pending is None
                    and (self._check_label.is_set() or time.monotonic() >= self._next_check)
                ):
                    self._check_weights()
        finally:
            consumer.close(autocommit=False)
            self.caught_up.set()

    def start(self, timeout_s: float = 600.0) -> None:
        """Start following; return once the newest published policy is loaded (or refused)."""
        self._thread = threading.Thread(target=self.run, name="policy", daemon=True)
        self._thread.start()
        if not self.caught_up.wait(timeout_s):
            raise TimeoutError(
                f"policy topic not read within {timeout_s}s"
                + (f": {self.failure.reason}: {self.failure.message}" if self.failure else "")
            )
        self.m_version.set(self.current.version)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self.http.close()
