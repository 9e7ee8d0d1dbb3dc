"""Preference pairs as TRL rows, and which pairs a round may train on."""

from __future__ import annotations

from collections.abc import Collection, Sequence, Sized
from typing import Any, Literal

from onpolicy import messages as m

Row = dict[str, Any]
Verdict = Literal["ok", "stale", "duplicate", "held_out", "too_long", "no_token_ids"]

# The dataset's columns: the sampled token ids DPO trains, TRL's text preference format (to
# read and reuse the dataset), then the pair's metadata.
COLUMNS = (
    "prompt_ids",
    "chosen_ids",
    "rejected_ids",
    "prompt",
    "chosen",
    "rejected",
    "chosen_finish_reason",
    "rejected_finish_reason",
    "pair_id",
    "prompt_id",
    "policy_version",
    "chosen_score",
    "rejected_score",
    "margin",
    "judge_id",
)


def to_row(pair: m.PreferencePair, conversational: bool = False) -> Row:
    """One dataset row: the sampled ids, TRL's prompt/chosen/rejected text, metadata.

    DPO trains ``prompt_ids + chosen_ids`` and ``prompt_ids + rejected_ids``: the prompt as
    vLLM templated it and each answer as drawn, with an end-of-turn token only where the
    sample ended on one. The text columns are what the sampler sent
    (``onpolicy.messages.model_input``) and the answers' text, for people and for reuse as a
    TRL preference dataset; ``conversational=True`` forces the conversational form (a
    dataset holds one format).
    """
    return {
        "prompt_ids": list(pair.prompt_token_ids),
        "chosen_ids": list(pair.chosen_token_ids),
        "rejected_ids": list(pair.rejected_token_ids),
        **m.trl_preference(pair, conversational),
        "chosen_finish_reason": pair.chosen_finish_reason,
        "rejected_finish_reason": pair.rejected_finish_reason,
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
    # Only the text columns need one format: the ids are trained as sampled either way.
    conversational = len({bool(p.prompt.messages) for p in pairs}) > 1
    return [to_row(p, conversational) for p in pairs]


def _longer(prompt: Sized, chosen: Sized, rejected: Sized) -> int:
    return len(prompt) + max(len(chosen), len(rejected))


def sequence_length(row: Row) -> int:
    """The longer of the row's two training sequences, in tokens."""
    return _longer(row["prompt_ids"], row["chosen_ids"], row["rejected_ids"])


def pair_length(pair: m.PreferencePair) -> int:
    """:func:`sequence_length` of a pair's sampled ids."""
    return _longer(pair.prompt_token_ids, pair.chosen_token_ids, pair.rejected_token_ids)


def min_version(current: int, max_staleness: int) -> int:
    """The oldest policy version whose samples the next round (current + 1) may train on."""
    return current - max_staleness


def admit(
    pair: m.PreferencePair,
    current: int,
    max_staleness: int,
    seen: Collection[str],
    max_length: int | None = None,
) -> Verdict:
    """Whether the round producing version ``current + 1`` may train on ``pair``.

    A pair without sampled token ids (written before the contract carried them) cannot be
    trained exactly as drawn, and one longer than ``max_length`` would have to be cut into
    another context: both are dropped with their reason, never trained approximately.
    """
    if pair.id in seen:
        return "duplicate"
    if pair.prompt.dataset_split == "eval":
        return "held_out"  # a held-out prompt is never trained on, whoever made the pair
    if pair.policy_version < min_version(current, max_staleness):
        return "stale"
    if not (pair.prompt_token_ids and pair.chosen_token_ids and pair.rejected_token_ids):
        return "no_token_ids"
    if max_length is not None and pair_length(pair) > max_length:
        return "too_long"
    return "ok"
