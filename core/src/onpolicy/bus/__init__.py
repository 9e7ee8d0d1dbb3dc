"""The Kafka bus: one producer, one stream processor, topic creation and a topic reader."""

from onpolicy.bus.breaker import CircuitBreaker
from onpolicy.bus.processor import (
    ConfigurationError,
    Output,
    Processor,
    ProcessorConfig,
    Record,
    TransientError,
)
from onpolicy.bus.producer import Producer, RecordTooLarge
from onpolicy.bus.reader import read_topic
from onpolicy.bus.topics import ensure_topics

__all__ = [
    "CircuitBreaker",
    "ConfigurationError",
    "Output",
    "Processor",
    "ProcessorConfig",
    "Producer",
    "Record",
    "RecordTooLarge",
    "TransientError",
    "ensure_topics",
    "read_topic",
]
