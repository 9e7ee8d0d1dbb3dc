"""Held-out evaluation: every policy version this replica serves samples the `heldout` topic.

The prompts on the `heldout` topic are never trained on. For each version it serves, a replica
consumes that topic from its beginning in a consumer group of that version
(``<group_id>.heldout.v<N>``): the replicas serving a version share its held-out prompts, each
is sampled once per version, and a restarted replica resumes where the group committed. The
state is Kafka's (the group's offsets), so restarts and rebalances change nothing.

Groups go to the completions topic like any other, with ``dataset_split`` set to ``eval``
(the judge scores them and builds no pairs) and stamped with the version that sampled them;
the trainer's evaluator aggregates the scores per version (``EvalResult`` on `evals`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading

from onpolicy import messages as m
from onpolicy.bus import Output, Processor, ProcessorConfig, Producer, Record, TransientError
from onpolicy.telemetry import Metrics
from onpolicy_sampler.policy import PolicyTracker
from onpolicy_sampler.settings import SamplerSettings
from onpolicy_sampler.worker import Sampler

log = logging.getLogger(__name__)

EVAL_SPLIT = "eval"


def heldout_group_id(group_id: str, version: int) -> str:
    """The consumer group that samples the held-out prompts with policy ``version``."""
    return f"{group_id}.heldout.v{version}"


class HeldOutSampler:
    """Runs one processor over the `heldout` topic per policy version, in a thread beside the
    prompts processor; the processor of a version stops when the replica serves another."""

    def __init__(
        self,
        settings: SamplerSettings,
        sampler: Sampler,
        tracker: PolicyTracker,
        metrics: Metrics,
        producer: Producer,
        loop: asyncio.AbstractEventLoop,
    ):
        self.settings = settings
        # The prompts processor's event loop: the vLLM client's connections belong to it, so
        # held-out requests run there too (they also share its concurrency with vLLM).
        self.loop = loop
        self.sampler = sampler
        self.tracker = tracker
        self.metrics = metrics
        self.producer = producer
        self.topic = settings.topics.name("heldout")
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.processor: Processor[m.Prompt] | None = None
        self.version: int | None = None  # the version being evaluated
        self.m_version = metrics.gauge(
            "heldout_version", "Policy version sampling the held-out prompts (-1: none)"
        )
        self.m_version.set(-1)

    async def handle(self, record: Record[m.Prompt], version: int) -> list[Output]:
        if self.tracker.current.version != version:
            # The replica moved on while this prompt waited: leave it uncommitted for the
            # group of ``version`` (another replica still serving it, or none).
            raise TransientError(f"policy v{version} is no longer served here")
        prompt = m.Prompt()
        prompt.CopyFrom(record.message)
        prompt.dataset_split = EVAL_SPLIT  # held out, whatever the publisher wrote
        outputs = await asyncio.wrap_future(
            asyncio.run_coroutine_threadsafe(
                self.sampler.handle(dataclasses.replace(record, message=prompt)), self.loop
            )
        )
        for out in outputs:
            group = out.message
            if isinstance(group, m.CompletionGroup) and group.policy_version != version:
                raise TransientError(f"sampled by v{group.policy_version}, not v{version}")
        return outputs

    def _processor(self, version: int) -> Processor[m.Prompt]:
        async def handler(record: Record[m.Prompt]) -> list[Output]:
            return await self.handle(record, version)

        return Processor(
            kafka=self.settings.kafka,
            source=self.topic,
            message_type=m.Prompt,
            handler=handler,
            config=ProcessorConfig(
                group_id=heldout_group_id(self.settings.group_id, version),
                concurrency=self.settings.heldout_concurrency,
            ),
            metrics=self.metrics,
            dead_letter_topic=self.settings.topics.name("dlq"),
            producer=self.producer,
        )

    def _run(self) -> None:
        while not self._stop.is_set():
            if not self.tracker.caught_up.is_set():
                self._stop.wait(0.5)
                continue
            version = self.tracker.current.version
            processor = self._processor(version)
            self.processor, self.version = processor, version
            self.m_version.set(version)
            log.info("sampling the held-out prompts (%s) with policy v%d", self.topic, version)
            worker = threading.Thread(
                target=processor.run,
                kwargs={"install_signal_handlers": False},
                name=f"heldout-v{version}",
                daemon=True,
            )
            worker.start()
            while worker.is_alive() and not self._stop.is_set():
                if self.tracker.current.version != version:
                    break
                worker.join(0.5)
            processor.stop()
            worker.join()
            self.processor, self.version = None, None
            self.m_version.set(-1)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="heldout", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=60)
