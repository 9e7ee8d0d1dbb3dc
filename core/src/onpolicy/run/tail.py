"""Follow topics from their beginning, keeping every decoded record (the loop's view)."""

from __future__ import annotations

from typing import Generic, TypeVar

from google.protobuf.message import Message
from kafka import KafkaConsumer
from kafka.structs import TopicPartition

from onpolicy.serde import RecordError, decode
from onpolicy.settings import KafkaSettings

M = TypeVar("M", bound=Message)


class TopicTail(Generic[M]):
    """All records of a topic so far, deduplicated by id; ``refresh()`` reads what is new."""

    def __init__(self, kafka: KafkaSettings, topic: str, message_type: type[M]):
        self.message_type = message_type
        self.consumer = KafkaConsumer(
            **kafka.client_config(), group_id=None, enable_auto_commit=False
        )
        partitions = self.consumer.partitions_for_topic(topic) or {0}
        tps = [TopicPartition(topic, p) for p in sorted(partitions)]
        self.consumer.assign(tps)
        self.consumer.seek_to_beginning(*tps)
        self.by_id: dict[str, M] = {}
        self.duplicates = 0

    def refresh(self, timeout_ms: int = 200) -> list[M]:
        new: list[M] = []
        for records in self.consumer.poll(timeout_ms=timeout_ms, max_records=10_000).values():
            for raw in records:
                try:
                    message = decode(self.message_type, raw.value, raw.headers)
                except RecordError:
                    continue
                key = message.id  # type: ignore[attr-defined]
                if key in self.by_id:
                    self.duplicates += 1
                    continue
                self.by_id[key] = message
                new.append(message)
        return new

    @property
    def records(self) -> list[M]:
        return list(self.by_id.values())

    def close(self) -> None:
        self.consumer.close(autocommit=False)
