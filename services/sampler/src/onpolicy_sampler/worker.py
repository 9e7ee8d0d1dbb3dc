"""The sampler's handler: one prompt in, one group of N samples out, stamped with the policy."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from google.protobuf.json_format import MessageToDict

from onpolicy import ids
from onpolicy import messages as m
from onpolicy.bus import Output, Record, TransientError
from onpolicy.rounds import RoundBook
from onpolicy.serde import InvalidRecord
from onpolicy.telemetry import Metrics
from onpolicy_sampler.policy import Policy, PolicyTracker
from onpolicy_sampler.settings import SamplerSettings
from onpolicy_sampler.vllm_client import ModelNotLoaded, Sample, VllmClient
from onpolicy_sampler.weights import served_label

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


def completion(index: int, sample: Sample) -> m.Completion:
    """One sample as drawn: its text, its token ids and what ended it."""
    out = m.Completion(
        index=index,
        text=sample.text,
        num_tokens=sample.num_tokens,
        finish_reason=sample.finish_reason,
        token_ids=sample.token_ids,
    )
    if isinstance(sample.stop_reason, int):
        out.stop_token_id = sample.stop_reason
    elif isinstance(sample.stop_reason, str):
        out.stop_string = sample.stop_reason
    return out


class Sampler:
    def __init__(
        self,
        settings: SamplerSettings,
        client: VllmClient,
        tracker: PolicyTracker,
        metrics: Metrics,
        rounds: RoundBook | None = None,
    ):
        self.settings = settings
        self.rounds = rounds
        self.client = client
        self.tracker = tracker
        self.out_topic = settings.topics.name("completions")
        self.m_groups = metrics.counter("groups_produced_total", "Completion groups produced")
        self.m_tokens = metrics.counter("completion_tokens_total", "Completion tokens sampled")
        self.m_prompts = metrics.counter("prompts_total", "Prompts taken, by split", ("split",))
        self.m_latency = metrics.histogram("request_seconds", "vLLM request latency")
        self.m_inflight = metrics.gauge("requests_in_flight", "vLLM requests in flight")
        self.m_errors = metrics.counter("errors_total", "Sampling errors by kind", ("kind",))
        self.m_gate = metrics.gauge(
            "gate_waiting", "Planned prompts waiting for the policy their round names"
        )

    async def _wait_for_turn(self, record: Record[m.Prompt]) -> None:
        """Round protocol: a training prompt is sampled by (at least) the policy its round
        names; the processor's fence already keeps unplanned prompts out."""
        if self.rounds is None or record.message.dataset_split == "eval":
            return
        plan = self.rounds.covering(record.partition, record.offset)
        # None: older than every plan (the fence keeps out what is newer), so no round waits
        # for it; sample it with the current policy.
        if plan is None or self.tracker.current.version >= plan.sample_version:
            return
        self.m_gate.inc()
        try:
            while self.tracker.current.version < plan.sample_version:
                await asyncio.sleep(0.2)
        finally:
            self.m_gate.dec()

    async def handle(self, record: Record[m.Prompt]) -> list[Output]:
        await self._wait_for_turn(record)
        if self.settings.handoff != "merged":
            return await self._handle(record)
        # merged: no reload between the request and the label read (the gate), and the group
        # carries the policy whose label vLLM reports after the request.
        async with self.tracker.gate.request():
            policy = self.tracker.current
            outputs = await self._handle(record, policy)
            label = await served_label(self.client.http)
        if not policy.proven_by(label):
            self.m_errors.labels("weights_mismatch").inc()
            self.tracker.notice_label(label)
            raise TransientError(
                f"vLLM reports weights {label!r} after the request, not v{policy.version}'s "
                f"({policy.label or 'base'}): sampled again once they are reloaded"
            )
        return outputs

    async def _handle(self, record: Record[m.Prompt], policy: Policy | None = None) -> list[Output]:
        prompt = record.message
        policy = policy or self.tracker.current
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
        budget = self.settings.max_prompt_tokens
        if budget is not None and len(result.prompt_token_ids) > budget:
            self.m_errors.labels("prompt_too_long").inc()
            raise InvalidRecord(
                f"the prompt has {len(result.prompt_token_ids)} tokens under the chat template, "
                f"more than sampler.max_prompt_tokens ({budget}): its pairs could not be trained "
                "on the context they were sampled in"
            )
        group = m.CompletionGroup(
            id=ids.group_id(prompt.id, policy.version),
            prompt_id=prompt.id,
            prompt=prompt,
            completions=[completion(i, s) for i, s in enumerate(result.samples)],
            prompt_token_ids=result.prompt_token_ids,
            sampling=params,
            source=m.PromptSource(
                topic=record.topic, partition=record.partition, offset=record.offset
            ),
            model=policy.label or policy.model,  # merged: the weights' label
            policy_version=policy.version,
            timings=m.Timings(queued_s=max(queued, 0.0), latency_s=latency),
            prompt_tokens=result.prompt_tokens,
        )
        self.m_groups.inc()
        self.m_prompts.labels(prompt.dataset_split or "train").inc()
        self.m_tokens.inc(sum(s.num_tokens for s in result.samples))
        return [Output(self.out_topic, group)]
