"""Topic creation from settings."""

from __future__ import annotations

import logging

from kafka.admin import KafkaAdminClient, NewTopic
from kafka.errors import TopicAlreadyExistsError

from onpolicy.settings import TOPIC_KINDS, KafkaSettings, TopicSettings

log = logging.getLogger(__name__)


def topic_configs(kind: str, topics: TopicSettings, kafka: KafkaSettings) -> dict[str, str]:
    configs = {
        "retention.ms": str(topics.retention_ms),
        # The broker must accept every record the producer may send.
        "max.message.bytes": str(kafka.max_request_size),
    }
    if kind in ("policy", "rounds", "heldout", "evals", "dlq"):
        # The policy and round history must survive (a restarted sampler replays them to find
        # the newest policy and what it may sample), every new version samples the held-out
        # prompts from the beginning, evaluations are the run's record, and dead letters wait
        # for a person.
        configs["retention.ms"] = "-1"
    return configs


def ensure_topics(kafka: KafkaSettings, topics: TopicSettings) -> list[str]:
    """Create the pipeline's topics that are missing; return the names created."""
    admin = KafkaAdminClient(**kafka.client_config(), client_id="onpolicy-admin")
    try:
        existing = set(admin.list_topics())
        new = [
            NewTopic(
                topics.name(kind),  # type: ignore[arg-type]
                # One partition keeps policy updates, round plans and evaluations ordered.
                num_partitions=1 if kind in ("policy", "rounds", "evals") else topics.partitions,
                replication_factor=topics.replication_factor,
                topic_configs=topic_configs(kind, topics, kafka),
            )
            for kind in TOPIC_KINDS
            if topics.name(kind) not in existing  # type: ignore[arg-type]
        ]
        created = []
        for topic in new:
            try:
                admin.create_topics([topic], timeout_ms=30_000)
                created.append(topic.name)
            except TopicAlreadyExistsError:
                pass  # another service won the race
        if created:
            log.info("created topics %s", ", ".join(created))
        return created
    finally:
        admin.close()
