"""``onpolicy status``: per-stage consumer lag, throughput and the current policy version."""

from __future__ import annotations

import time
from dataclasses import dataclass

from kafka import KafkaConsumer
from kafka.admin import KafkaAdminClient
from kafka.errors import KafkaError
from kafka.structs import TopicPartition

from onpolicy import messages as m
from onpolicy.bus import read_topic
from onpolicy.settings import KafkaSettings, TopicSettings

STAGES = (("sampler", "prompts"), ("judge", "completions"), ("trainer", "pairs"))


@dataclass
class StageStatus:
    group: str
    topic: str
    end: int
    committed: int
    lag: int
    records_per_s: float


def _ends(consumer: KafkaConsumer, topic: str) -> dict[TopicPartition, int]:
    partitions = consumer.partitions_for_topic(topic) or set()
    return (
        consumer.end_offsets([TopicPartition(topic, p) for p in partitions]) if partitions else {}
    )


def pipeline_status(
    kafka: KafkaSettings, topics: TopicSettings, window_s: float = 2.0
) -> tuple[list[StageStatus], int | None]:
    admin = KafkaAdminClient(**kafka.client_config())
    consumer = KafkaConsumer(**kafka.client_config(), group_id=None)
    try:
        names = [topics.name(t) for _, t in STAGES]  # type: ignore[arg-type]
        before = {n: _ends(consumer, n) for n in names}
        time.sleep(window_s)
        after = {n: _ends(consumer, n) for n in names}
        stages = []
        for group, kind in STAGES:
            name = topics.name(kind)  # type: ignore[arg-type]
            try:
                offsets = admin.list_group_offsets(group).get(group, {})
            except KafkaError:  # no such group yet (or the coordinator is still loading)
                offsets = {}
            committed = sum(
                meta.offset for tp, meta in offsets.items() if tp.topic == name and meta.offset >= 0
            )
            end = sum(after[name].values())
            rate = (end - sum(before[name].values())) / window_s
            stages.append(StageStatus(group, name, end, committed, max(end - committed, 0), rate))
        versions = [
            r.message.version for r in read_topic(kafka, topics.name("policy"), m.PolicyUpdate)
        ]
        return stages, max(versions) if versions else 0
    finally:
        consumer.close()
        admin.close()
