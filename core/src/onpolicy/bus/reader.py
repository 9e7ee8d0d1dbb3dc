"""Read a topic from the beginning to its current end, outside any consumer group."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import TypeVar

from google.protobuf.message import Message
from kafka import KafkaConsumer
from kafka.structs import TopicPartition

from onpolicy.bus.processor import Record
from onpolicy.serde import RecordError, decode
from onpolicy.settings import KafkaSettings

M = TypeVar("M", bound=Message)


def read_topic(
    kafka: KafkaSettings, topic: str, message_type: type[M], timeout_s: float = 30.0
) -> Iterator[Record[M]]:
    """Yield every decodable record now in ``topic`` (skipping undecodable ones)."""
    consumer = KafkaConsumer(**kafka.client_config(), enable_auto_commit=False, group_id=None)
    try:
        partitions = consumer.partitions_for_topic(topic) or set()
        tps = [TopicPartition(topic, p) for p in sorted(partitions)]
        if not tps:
            return
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        end = consumer.end_offsets(tps)
        deadline = time.monotonic() + timeout_s
        while any(consumer.position(tp) < end[tp] for tp in tps):
            if time.monotonic() > deadline:
                raise TimeoutError(f"reading {topic} took over {timeout_s}s")
            for tp, records in consumer.poll(timeout_ms=200).items():
                for raw in records:
                    if raw.offset >= end[tp]:
                        continue
                    try:
                        message = decode(message_type, raw.value, raw.headers)
                    except RecordError:
                        continue
                    yield Record(
                        message,
                        raw.topic,
                        raw.partition,
                        raw.offset,
                        raw.key,
                        list(raw.headers or []),
                        raw.timestamp,
                    )
    finally:
        consumer.close(autocommit=False)
