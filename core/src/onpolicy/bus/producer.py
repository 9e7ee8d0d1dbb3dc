"""The producer: idempotent, acks=all, compressed, headers; errors always surface."""

from __future__ import annotations

import asyncio
import contextlib
from concurrent.futures import Future

from google.protobuf.message import Message
from kafka import KafkaProducer
from kafka.errors import KafkaError, MessageSizeTooLargeError
from kafka.producer.future import RecordMetadata

from onpolicy.messages import record_id
from onpolicy.serde import RecordError, WireFormat, encode
from onpolicy.settings import KafkaSettings


class RecordTooLarge(RecordError):
    kind = "too_large"


class Producer:
    """Thin wrapper over ``KafkaProducer`` that keys every record by its deterministic id."""

    def __init__(self, kafka: KafkaSettings, client_id: str = "onpolicy"):
        self.kafka = kafka
        self._producer = KafkaProducer(
            **kafka.client_config(),
            client_id=client_id,
            enable_idempotence=True,
            acks="all",
            compression_type=None if kafka.compression == "none" else kafka.compression,
            linger_ms=kafka.linger_ms,
            max_request_size=kafka.max_request_size,
            allow_auto_create_topics=False,
        )

    def _too_large(self, size: int, topic: str, exc: Exception) -> RecordTooLarge:
        return RecordTooLarge(
            f"record of {size} bytes for topic {topic!r} is over the size limits: the producer's "
            f"kafka.max_request_size={self.kafka.max_request_size} and the topic's "
            f"max.message.bytes ({exc})"
        )

    def send(
        self, topic: str, message: Message, fmt: WireFormat = "protobuf"
    ) -> Future[RecordMetadata]:
        """Send ``message`` keyed by its id; the returned future fails if delivery fails."""
        key = record_id(message).encode()
        value, headers = encode(message, fmt)
        result: Future[RecordMetadata] = Future()
        try:
            kfuture = self._producer.send(topic, value=value, key=key, headers=headers)
        except MessageSizeTooLargeError as exc:
            result.set_exception(self._too_large(len(value), topic, exc))
            return result

        def _failed(exc: Exception) -> None:
            if isinstance(exc, MessageSizeTooLargeError):
                exc = self._too_large(len(value), topic, exc)
            result.set_exception(exc)

        kfuture.add_callback(result.set_result)
        kfuture.add_errback(_failed)
        return result

    def send_sync(
        self, topic: str, message: Message, timeout: float = 60.0, fmt: WireFormat = "protobuf"
    ) -> RecordMetadata:
        return self.send(topic, message, fmt).result(timeout)

    async def send_async(
        self, topic: str, message: Message, fmt: WireFormat = "protobuf"
    ) -> RecordMetadata:
        return await asyncio.wrap_future(self.send(topic, message, fmt))

    def flush(self, timeout: float | None = None) -> None:
        # Each send's own future reports its failure; flush only waits for them.
        with contextlib.suppress(KafkaError):
            self._producer.flush(timeout=timeout)

    def close(self, timeout: float = 10.0) -> None:
        self._producer.close(timeout=timeout)
