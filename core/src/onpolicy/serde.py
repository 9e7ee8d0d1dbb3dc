"""Wire format of every Kafka record.

Producers write protobuf binary with three headers (content type, message type, schema
version). Consumers also accept protobuf's canonical JSON, flagged by
``content-type: application/json`` or, with no content-type header, a payload that is a JSON
object, so a person can publish a prompt with any Kafka tool as one JSON line.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Literal, TypeVar

from google.protobuf import json_format
from google.protobuf.message import DecodeError as _ProtoDecodeError
from google.protobuf.message import Message

CONTENT_TYPE = "content-type"
MESSAGE_TYPE = "message-type"
SCHEMA_VERSION = "schema-version"
PROTOBUF = "application/x-protobuf"
JSON = "application/json"
CURRENT_SCHEMA_VERSION = "1"

Headers = Sequence[tuple[str, bytes]]
WireFormat = Literal["protobuf", "json"]
M = TypeVar("M", bound=Message)


class RecordError(Exception):
    """A record that cannot be used; it goes to the dead-letter topic with ``kind``."""

    kind = "invalid"


class DecodeError(RecordError):
    kind = "decode"


class InvalidRecord(RecordError):
    kind = "invalid"


def encode(message: Message, fmt: WireFormat = "protobuf") -> tuple[bytes, list[tuple[str, bytes]]]:
    """Serialize ``message`` and return ``(value, headers)``."""
    if fmt == "json":
        value = json_format.MessageToJson(message, indent=None).encode()
        content_type = JSON
    else:
        value = message.SerializeToString(deterministic=True)
        content_type = PROTOBUF
    headers = [
        (CONTENT_TYPE, content_type.encode()),
        (MESSAGE_TYPE, message.DESCRIPTOR.full_name.encode()),
        (SCHEMA_VERSION, CURRENT_SCHEMA_VERSION.encode()),
    ]
    return value, headers


def header(headers: Headers | None, name: str) -> str | None:
    for key, value in headers or ():
        if key.lower() == name:
            return value.decode("utf-8", errors="replace") if value is not None else None
    return None


def decode(cls: type[M], value: bytes | None, headers: Headers | None = None) -> M:
    """Parse ``value`` as ``cls``; raise :class:`DecodeError` saying why it cannot be."""
    type_name = cls.DESCRIPTOR.full_name
    if value is None:
        raise DecodeError("record has no value (tombstone)")
    version = header(headers, SCHEMA_VERSION)
    if version is not None and version.split(".")[0] != CURRENT_SCHEMA_VERSION:
        raise DecodeError(
            f"unsupported schema-version {version!r}; this consumer reads {CURRENT_SCHEMA_VERSION}"
        )
    declared = header(headers, MESSAGE_TYPE)
    if declared is not None and declared != type_name:
        raise DecodeError(f"message-type header is {declared!r}, expected {type_name!r}")

    content_type = (header(headers, CONTENT_TYPE) or "").split(";")[0].strip().lower()
    if not content_type:
        if not value.lstrip().startswith(b"{"):
            raise DecodeError("no content-type header and the payload is not a JSON object")
        content_type = JSON

    message = cls()
    if content_type == JSON:
        try:
            text = value.decode("utf-8")
            if not isinstance(json.loads(text), dict):
                raise DecodeError(f"JSON payload for {type_name} must be an object")
            json_format.Parse(text, message)
        except (UnicodeDecodeError, ValueError, json_format.ParseError) as exc:
            raise DecodeError(f"invalid JSON for {type_name}: {exc}") from exc
    elif content_type == PROTOBUF:
        try:
            message.ParseFromString(value)
        except _ProtoDecodeError as exc:
            raise DecodeError(f"invalid protobuf for {type_name}: {exc}") from exc
    else:
        raise DecodeError(f"unsupported content-type {content_type!r}")
    return message
