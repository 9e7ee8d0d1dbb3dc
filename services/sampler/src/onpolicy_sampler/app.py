"""Wiring of the sampler service: vLLM client, policy tracker, processor, health checks."""

from __future__ import annotations

import httpx

from onpolicy.bus import Processor, ProcessorConfig, Producer
from onpolicy.messages import Prompt
from onpolicy.rounds import RoundFollower
from onpolicy.telemetry import Metrics, ServiceServer
from onpolicy_sampler.evaluation import HeldOutSampler
from onpolicy_sampler.policy import PolicyTracker
from onpolicy_sampler.settings import SamplerSettings
from onpolicy_sampler.vllm_client import VllmClient
from onpolicy_sampler.worker import Sampler


class SamplerService(Processor[Prompt]):
    """The prompts processor, which first catches up with the newest policy."""

    def __init__(self, settings: SamplerSettings, metrics: Metrics):
        api_key = settings.vllm_api_key.get_secret_value() if settings.vllm_api_key else None
        producer = Producer(settings.kafka, client_id=settings.group_id)
        self.tracker = PolicyTracker(
            kafka=settings.kafka,
            topic=settings.topics.name("policy"),
            dead_letter_topic=settings.topics.name("dlq"),
            vllm_url=settings.vllm_url,
            base_model=settings.served_model_name,
            keep_adapters=settings.keep_adapters,
            cache_dir=settings.adapter_cache_dir,
            metrics=metrics,
            producer=producer,
            api_key=api_key,
            adapter_prefix=settings.adapter_prefix,
            max_lora_rank=settings.max_lora_rank,
            adapter_uri_prefixes=settings.adapter_uri_prefixes,
            retry_initial_s=settings.policy_retry_initial_s,
            retry_max_s=settings.policy_retry_max_s,
            handoff=settings.handoff,
            drain_timeout_s=settings.request_timeout_s,
        )
        self.client = VllmClient(
            settings.vllm_url,
            api_key,
            settings.request_timeout_s,
            max_connections=settings.concurrency * 2,
        )
        # The round protocol: the rounds topic says which prompts may be sampled, and by
        # which policy (see onpolicy.rounds).
        self.rounds = (
            RoundFollower(settings.kafka, settings.topics.name("rounds"))
            if settings.round_protocol
            else None
        )
        book = self.rounds.book if self.rounds else None
        self.sampler = Sampler(settings, self.client, self.tracker, metrics, book)
        super().__init__(
            kafka=settings.kafka,
            source=settings.topics.name("prompts"),
            message_type=Prompt,
            handler=self.sampler.handle,
            config=ProcessorConfig(group_id=settings.group_id, concurrency=settings.concurrency),
            metrics=metrics,
            dead_letter_topic=settings.topics.name("dlq"),
            producer=producer,
            fence=book.fence if book else None,
        )
        self._own_producer = True
        self.settings = settings
        self.metrics = metrics
        self.heldout = (
            HeldOutSampler(settings, self.sampler, self.tracker, metrics, producer, self._loop)
            if settings.heldout
            else None
        )

    def vllm_ok(self) -> bool:
        try:
            return httpx.get(f"{self.settings.vllm_url}/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def policy_view(self) -> dict[str, object]:
        tracker = self.tracker
        failure = tracker.failure
        return {
            "version": tracker.current.version,
            "model": tracker.current.model,
            "adapter_path": tracker.current.adapter_path,
            "handoff": tracker.handoff,
            "label": tracker.current.label,
            "weights_failure": tracker.weights_failure,
            "loaded": [p.model for p in tracker.loaded],
            "ready": tracker.ready(),
            "failure": failure.__dict__ if failure else None,
            "heldout_version": self.heldout.version if self.heldout else None,
        }

    def run(self, install_signal_handlers: bool = True) -> None:
        self.tracker.start()
        if self.rounds is not None:
            self.rounds.start()
        if self.heldout is not None:
            self.heldout.start()
        try:
            super().run(install_signal_handlers)
        finally:
            if self.heldout is not None:
                self.heldout.stop()
            if self.rounds is not None:
                self.rounds.stop()
            self.tracker.stop()


def add_checks(service: SamplerService, server: ServiceServer) -> None:
    """The sampler's readiness checks and its /policy route on the service's HTTP server."""
    server.add_check("vllm", service.vllm_ok)
    # Caught up with the policy topic and serving its newest policy (not refused, not failing).
    server.add_check("policy", service.tracker.ready)
    server.add_check("backend", lambda: service.backend_ok)
    server.app.add_api_route("/policy", service.policy_view, methods=["GET"])


def build(settings: SamplerSettings, metrics: Metrics, server: ServiceServer) -> SamplerService:
    service = SamplerService(settings, metrics)
    add_checks(service, server)
    return service
