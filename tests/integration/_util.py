"""Helpers for integration tests against the real broker."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TypeVar

from google.protobuf.message import Message
from kafka.admin import KafkaAdminClient

from onpolicy import messages as m
from onpolicy.bus import Processor, Record, read_topic
from onpolicy.settings import KafkaSettings

M = TypeVar("M", bound=Message)


@contextmanager
def running(processor: Processor) -> Iterator[Processor]:
    thread = threading.Thread(
        target=processor.run, kwargs={"install_signal_handlers": False}, daemon=True
    )
    thread.start()
    try:
        yield processor
    finally:
        processor.stop()
        thread.join(60)
        assert not thread.is_alive(), "processor did not stop"


def wait_records(
    kafka: KafkaSettings, topic: str, cls: type[M], n: int, timeout: float = 60.0
) -> list[Record[M]]:
    """All records of ``topic`` once there are at least ``n`` (fails after ``timeout``)."""
    deadline = time.monotonic() + timeout
    while True:
        records = list(read_topic(kafka, topic, cls))
        if len(records) >= n:
            return records
        if time.monotonic() > deadline:
            raise AssertionError(f"{topic}: {len(records)} records after {timeout}s, wanted {n}")
        time.sleep(0.3)


def wait_until(check, timeout: float = 60.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def committed(kafka: KafkaSettings, group: str, topic: str) -> dict[int, int]:
    admin = KafkaAdminClient(**kafka.client_config())
    try:
        offsets = admin.list_group_offsets(group).get(group, {})
    finally:
        admin.close()
    return {tp.partition: meta.offset for tp, meta in offsets.items() if tp.topic == topic}


def sample_value(metrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(f"onpolicy_{metrics.service}_{name}", labels)
    return value or 0.0


def scored(
    topics, prompt_id: str, version: int, scores: list[float], topic: str = "heldout"
) -> m.ScoredGroup:
    """A judged group of ``version`` for ``prompt_id`` from ``topic`` (held-out by default)."""
    group = m.CompletionGroup(
        id=f"g-{prompt_id}-{version}-{topic}",
        prompt_id=prompt_id,
        prompt=m.Prompt(id=prompt_id, text="q", dataset_split="eval"),
        completions=[
            m.Completion(index=i, text="a", num_tokens=10 + i, finish_reason="stop")
            for i in range(len(scores))
        ],
        policy_version=version,
        source=m.PromptSource(topic=topics.name(topic), partition=0, offset=0),
    )
    return m.ScoredGroup(id=f"s-{group.id}", group=group, scores=scores, judge_id="fn:test")
