"""Deterministic record ids.

Every record's id is a pure function of what identifies it, and it is also the record's
Kafka key: a record produced twice (at-least-once delivery, a retried request) carries the
same id both times, so any consumer can drop the duplicate.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable


def digest(*parts: object, prefix: str, size: int = 16) -> str:
    """A short stable hash of ``parts`` (JSON-encoded so that ("a", "bc") != ("ab", "c"))."""
    payload = json.dumps(list(parts), sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return f"{prefix}-{hashlib.blake2b(payload.encode(), digest_size=size).hexdigest()}"


def prompt_id(
    text: str, messages: Iterable[tuple[str, str]], system_prompt: str | None, round_: int = 0
) -> str:
    """Content-addressed prompt id, used when the publisher gives none."""
    return digest(text, [list(m) for m in messages], system_prompt or "", round_, prefix="p")


def group_id(prompt_id: str, policy_version: int) -> str:
    return digest(prompt_id, policy_version, prefix="g")


def scored_id(group_id: str, judge_id: str) -> str:
    return digest(group_id, judge_id, prefix="s")


def pair_id(
    prompt_id: str, policy_version: int, chosen_index: int, rejected_index: int, judge_id: str
) -> str:
    return digest(prompt_id, policy_version, chosen_index, rejected_index, judge_id, prefix="pair")


def policy_id(version: int) -> str:
    return f"policy-v{version}"


def eval_id(version: int) -> str:
    return f"eval-v{version}"


def round_plan_id(round_: int, seq: int) -> str:
    return f"round-{round_}-{seq}"


def dead_letter_id(topic: str, partition: int, offset: int) -> str:
    return digest(topic, partition, offset, prefix="dlq")
