"""The sampler's handler: one prompt in, one group of N samples out, stamped with the policy."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from google.protobuf.json_format import MessageToDict

from onpolicy import ids
from onpolicy import messages as m
from onpolicy.bus import Output, Record
from onpolicy.telemetry import Metrics
from onpolicy_sampler.policy import PolicyTracker
from onpolicy_sampler.settings import SamplerSettings
from onpolicy_sampler.vllm_client import ModelNotLoaded, VllmClient

log = logging.getLogger(__name__)


def sampling_params(settings: SamplerSettings, prompt: m.Prompt) -> m.SamplingParams:
    """Settings' defaults, overridden field by field by the prompt's own parameters."""
    params = m.SamplingParams(
        temperature=settings.temperature,
        top_p=settings.top_p,
        max_tokens=settings.max_tokens,
        stop=settings.stop,
    )
    if settings.seed is not None:
        params.seed = settings.seed
    if settings.top_k is not None:
        params.top_k = settings.top_k
    override = prompt.sampling
    for field in ("temperature", "top_p", "max_tokens", "seed", "top_k"):
        if override.HasField(field):
            setattr(params, field, getattr(override, field))
    if override.stop:
        params.stop[:] = list(override.stop)
    return params


class Sampler:
    def __init__(
        self,
        settings: SamplerSettings,
        client: VllmClient,
        tracker: PolicyTracker,
        metrics: Metrics,
    ):
        self.settings = settings
        self.client = client
        self.tracker = tracker
        self.out_topic = settings.topics.name("completions")
        self._round_counts: dict[int, int] = {}
        self.m_groups = metrics.counter("groups_produced_total", "Completion groups produced")
        self.m_tokens = metrics.counter("completion_tokens_total", "Completion tokens sampled")
        self.m_prompts = metrics.counter("prompts_total", "Prompts taken, by split", ("split",))
        self.m_latency = metrics.histogram("request_seconds", "vLLM request latency")
        self.m_inflight = metrics.gauge("requests_in_flight", "vLLM requests in flight")
        self.m_errors = metrics.counter("errors_total", "Sampling errors by kind", ("kind",))
        self.m_gate = metrics.gauge("gate_waiting", "Prompts waiting for the next policy")

    async def _wait_for_turn(self, prompt: m.Prompt) -> None:
        """Strict on-policy gate: a policy samples at most ``round_prompts`` training prompts."""
        quota = self.settings.round_prompts
        if not quota or prompt.dataset_split == "eval":
            return
        self.m_gate.inc()
        try:
            while True:
                version = self.tracker.current.version
                if self._round_counts.get(version, 0) < quota:
                    self._round_counts[version] = self._round_counts.get(version, 0) + 1
                    return
                await asyncio.sleep(0.2)
        finally:
            self.m_gate.dec()

    async def handle(self, record: Record[m.Prompt]) -> list[Output]:
        prompt = record.message
        await self._wait_for_turn(prompt)
        policy = self.tracker.current
        params = sampling_params(self.settings, prompt)
        n = prompt.num_samples if prompt.HasField("num_samples") else self.settings.num_samples
        request: dict[str, Any] = {
            k: v for k, v in MessageToDict(params, preserving_proto_field_name=True).items()
        }
        queued = time.time() - record.timestamp_ms / 1000
        started = time.monotonic()
        self.m_inflight.inc()
        try:
            given = m.model_input(prompt)
            if isinstance(given, list):
                result = await self.client.sample(
                    model=policy.model, params=request, n=n, messages=given
                )
            else:
                result = await self.client.sample(
                    model=policy.model, params=request, n=n, prompt=given
                )
        except ModelNotLoaded:
            self.m_errors.labels("adapter_missing").inc()
            await asyncio.to_thread(self.tracker.reload_current)
            raise
        except Exception as exc:
            self.m_errors.labels(type(exc).__name__).inc()
            raise
        finally:
            self.m_inflight.dec()
        latency = time.monotonic() - started
        self.m_latency.observe(latency)
        group = m.CompletionGroup(
            id=ids.group_id(prompt.id, policy.version),
            prompt_id=prompt.id,
            prompt=prompt,
            completions=[
                m.Completion(
                    index=i, text=s.text, num_tokens=s.num_tokens, finish_reason=s.finish_reason
                )
                for i, s in enumerate(result.samples)
            ],
            sampling=params,
            model=policy.model,
            policy_version=policy.version,
            timings=m.Timings(queued_s=max(queued, 0.0), latency_s=latency),
            prompt_tokens=result.prompt_tokens,
        )
        self.m_groups.inc()
        self.m_prompts.labels(prompt.dataset_split or "train").inc()
        self.m_tokens.inc(sum(s.num_tokens for s in result.samples))
        return [Output(self.out_topic, group)]
