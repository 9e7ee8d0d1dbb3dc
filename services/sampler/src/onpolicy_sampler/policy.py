"""Policy tracking: follow the policy topic and keep vLLM serving the newest adapter.

Every replica reads the whole (single-partition) policy topic outside any consumer group, so
all replicas converge on the same, newest policy. On start the topic is read to its end and
the newest adapter loaded before any prompt is taken.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import fsspec
import httpx
from kafka import KafkaConsumer
from kafka.structs import TopicPartition

from onpolicy import messages as m
from onpolicy.bus import Producer
from onpolicy.messages import DeadLetter
from onpolicy.serde import RecordError, decode
from onpolicy.settings import KafkaSettings
from onpolicy.telemetry import Metrics

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Policy:
    version: int
    model: str  # the name to request from vLLM: the base model or the adapter
    adapter_path: str | None = None


def adapter_name(version: int, prefix: str = "policy") -> str:
    return f"{prefix}-v{version}"


def fetch_adapter(uri: str, cache_dir: Path, version: int) -> str:
    """A local folder holding the adapter: the URI itself, or a copy fetched with fsspec."""
    if "://" not in uri or uri.startswith("file://"):
        path = uri.removeprefix("file://")
        if not Path(path, "adapter_config.json").exists():
            raise FileNotFoundError(f"no adapter_config.json in {path}")
        return path
    target = cache_dir / adapter_name(version)
    if not (target / "adapter_config.json").exists():
        fs, remote = fsspec.core.url_to_fs(uri)
        partial = target.with_name(target.name + ".partial")
        fs.get(remote.rstrip("/") + "/", str(partial), recursive=True)
        partial.rename(target)
    return str(target)


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
    ):
        self.kafka = kafka
        self.topic = topic
        self.dead_letter_topic = dead_letter_topic
        self.base = Policy(0, base_model)
        self.current = self.base
        self.keep_adapters = keep_adapters
        self.adapter_prefix = adapter_prefix
        self.cache_dir = cache_dir
        self.producer = producer
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(base_url=vllm_url, headers=headers, timeout=60)
        self.loaded: list[Policy] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.caught_up = threading.Event()
        self.m_version = metrics.gauge("policy_version", "Policy version being sampled")
        self.m_loads = metrics.counter("adapter_loads_total", "Adapters loaded into vLLM")
        self.m_load_seconds = metrics.histogram("adapter_load_seconds", "Adapter fetch + load")

    # ------------------------------------------------------------------ vLLM side
    def _load(self, policy: Policy) -> None:
        assert policy.adapter_path is not None
        response = self.http.post(
            "/v1/load_lora_adapter",
            json={"lora_name": policy.model, "lora_path": policy.adapter_path},
        )
        if response.status_code >= 400 and "already" not in response.text.lower():
            raise RuntimeError(
                f"vLLM refused adapter {policy.model} ({response.status_code}): "
                f"{response.text[:300]}"
            )

    def _unload(self, policy: Policy) -> None:
        try:
            self.http.post("/v1/unload_lora_adapter", json={"lora_name": policy.model})
        except httpx.HTTPError as exc:
            log.warning("unloading %s failed: %s", policy.model, exc)

    def _activate(self, update: m.PolicyUpdate) -> None:
        if update.version <= self.current.version:
            return  # replayed or out of date: the newest policy wins
        started = time.monotonic()
        uri = update.adapter_uri or update.checkpoint_uri
        path = fetch_adapter(uri, self.cache_dir, update.version)
        policy = Policy(update.version, adapter_name(update.version, self.adapter_prefix), path)
        self._retry(lambda: self._load(policy), f"load {policy.model}")
        with self._lock:
            self.current = policy
            self.loaded.append(policy)
            stale, self.loaded = (
                self.loaded[: -self.keep_adapters],
                self.loaded[-self.keep_adapters :],
            )
        for old in stale:
            self._unload(old)
        self.m_version.set(policy.version)
        self.m_loads.inc()
        self.m_load_seconds.observe(time.monotonic() - started)
        log.info(
            "now sampling policy v%d (%s, loaded in %.2fs)",
            policy.version,
            path,
            time.monotonic() - started,
        )

    def reload_current(self) -> None:
        """vLLM lost the adapter (it restarted): load it again."""
        with self._lock:
            policy = self.current
        if policy.adapter_path is not None:
            self._retry(lambda: self._load(policy), f"reload {policy.model}")
            log.info("reloaded %s into vLLM", policy.model)

    def _retry(self, action, what: str) -> None:
        backoff = 0.5
        while True:
            try:
                action()
                return
            except (httpx.HTTPError, RuntimeError) as exc:
                if self._stop.is_set():
                    raise
                log.warning("%s failed (%s); retrying in %.1fs", what, exc, backoff)
                time.sleep(backoff)
                backoff = min(backoff * 2, 15)

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
        self._pending = update  # only the newest matters while catching up

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
                self._pending: m.PolicyUpdate | None = None
                for records in consumer.poll(timeout_ms=500).values():
                    for raw in records:
                        self._handle(raw)
                if self._pending is not None:
                    try:
                        self._activate(self._pending)
                    except Exception:  # a broken update must not stop policy tracking
                        log.exception("cannot activate policy v%d", self._pending.version)
                if not self.caught_up.is_set() and consumer.position(tp) >= end:
                    self.caught_up.set()
                    log.info("policy topic read to its end: sampling v%d", self.current.version)
        finally:
            consumer.close(autocommit=False)
            self.caught_up.set()

    def start(self, timeout_s: float = 600.0) -> None:
        """Start following; return once the newest published policy is loaded."""
        self._thread = threading.Thread(target=self.run, name="policy", daemon=True)
        self._thread.start()
        if not self.caught_up.wait(timeout_s):
            raise TimeoutError(f"policy topic not read within {timeout_s}s")
        self.m_version.set(self.current.version)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self.http.close()
