"""Preference pairs as TRL rows, and which pairs a round may train on."""

from __future__ import annotations

from collections.abc import Collection
from typing import Any, Literal

from onpolicy import messages as m

Row = dict[str, Any]
Verdict = Literal["ok", "stale", "duplicate"]

# The dataset's columns: TRL's conversational preference format, then the pair's metadata.
COLUMNS = (
    "prompt",
    "chosen",
    "rejected",
    "pair_id",
    "prompt_id",
    "policy_version",
    "chosen_score",
    "rejected_score",
    "margin",
    "judge_id",
)


# The prompt as chat turns, as the sampler sent it to vLLM (the core's one implementation).
prompt_messages = m.chat_turns


def to_row(pair: m.PreferencePair) -> Row:
    """One dataset row: conversational prompt/chosen/rejected plus metadata."""
    return {
        "prompt": prompt_messages(pair.prompt),
        "chosen": [{"role": "assistant", "content": pair.chosen}],
        "rejected": [{"role": "assistant", "content": pair.rejected}],
        "pair_id": pair.id,
        "prompt_id": pair.prompt_id,
        "policy_version": int(pair.policy_version),
        "chosen_score": float(pair.chosen_score),
        "rejected_score": float(pair.rejected_score),
        "margin": float(pair.margin),
        "judge_id": pair.judge_id,
    }


def min_version(current: int, max_staleness: int) -> int:
    """The oldest policy version whose samples the next round (current + 1) may train on."""
    return current - max_staleness


def admit(
    pair: m.PreferencePair, current: int, max_staleness: int, seen: Collection[str]
) -> Verdict:
    """Whether the round producing version ``current + 1`` may train on ``pair``."""
    if pair.id in seen:
        return "duplicate"
    if pair.policy_version < min_version(current, max_staleness):
        return "stale"
    return "ok"
