"""Preference pairs as TRL rows, and which pairs a round may train on."""

from __future__ import annotations

import logging
from collections.abc import Collection, Sequence
from typing import Any, Literal

from onpolicy import messages as m

log = logging.getLogger(__name__)

Row = dict[str, Any]
Verdict = Literal["ok", "stale", "duplicate"]

# The dataset's columns: TRL's preference format, then the pair's metadata.
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


def to_row(pair: m.PreferencePair, conversational: bool = False) -> Row:
    """One dataset row: TRL's prompt/chosen/rejected plus metadata.

    The prompt is what the sampler sent (``onpolicy.messages.model_input``): chat prompts in
    TRL's conversational format, raw-text prompts in its standard (string) format, so DPO
    scores each pair under the context that produced it. ``conversational=True`` forces the
    conversational form (a round that mixes both kinds must use one format).
    """
    return {
        **m.trl_preference(pair, conversational),
        "pair_id": pair.id,
        "prompt_id": pair.prompt_id,
        "policy_version": int(pair.policy_version),
        "chosen_score": float(pair.chosen_score),
        "rejected_score": float(pair.rejected_score),
        "margin": float(pair.margin),
        "judge_id": pair.judge_id,
    }


def to_rows(pairs: Sequence[m.PreferencePair]) -> list[Row]:
    """A round's rows in one format (TRL trains, and Parquet stores, one per dataset)."""
    kinds = {bool(p.prompt.messages) for p in pairs}
    if len(kinds) > 1:
        log.warning(
            "this round mixes chat and raw-text prompts; its raw-text prompts train as one "
            "user turn under the chat template, which differs from how they were sampled"
        )
        return [to_row(p, conversational=True) for p in pairs]
    return [to_row(p) for p in pairs]


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
