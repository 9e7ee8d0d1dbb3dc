"""Validation and ids of the contract's messages (``proto/onpolicy/v1``).

Decoding (``serde``) only checks the wire format; ``validate`` checks what the pipeline
needs of each message and fills in ids that a publisher may leave empty.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from google.protobuf.message import Message

from onpolicy import ids
from onpolicy.serde import InvalidRecord
from onpolicy.v1.messages_pb2 import (
    ChatMessage,
    Completion,
    CompletionGroup,
    DeadLetter,
    EvalLabelStats,
    EvalResult,
    OffsetRange,
    PolicyUpdate,
    PreferencePair,
    Prompt,
    PromptSource,
    RoundPlan,
    SamplingParams,
    ScoredGroup,
    Timings,
)

__all__ = [
    "ChatMessage",
    "Completion",
    "CompletionGroup",
    "DeadLetter",
    "EvalLabelStats",
    "EvalResult",
    "OffsetRange",
    "PolicyUpdate",
    "PreferencePair",
    "Prompt",
    "PromptSource",
    "RoundPlan",
    "SamplingParams",
    "ScoredGroup",
    "Timings",
    "chat_turns",
    "model_input",
    "record_id",
    "trl_preference",
    "validate",
]

ROLES = frozenset({"system", "user", "assistant"})


def _prompt(p: Prompt) -> None:
    if p.text and p.messages:
        raise InvalidRecord("prompt sets both text and messages; set exactly one")
    if not p.text.strip() and not p.messages:
        raise InvalidRecord("prompt is empty: set text or messages")
    for i, m in enumerate(p.messages):
        if m.role not in ROLES:
            raise InvalidRecord(
                f"messages[{i}].role is {m.role!r}; expected one of {sorted(ROLES)}"
            )
        if not m.content.strip():
            raise InvalidRecord(f"messages[{i}].content is empty")
    if p.HasField("num_samples") and p.num_samples < 1:
        raise InvalidRecord(f"num_samples must be >= 1, got {p.num_samples}")
    s = p.sampling
    if s.HasField("max_tokens") and s.max_tokens < 1:
        raise InvalidRecord(f"sampling.max_tokens must be >= 1, got {s.max_tokens}")
    if s.HasField("temperature") and s.temperature < 0:
        raise InvalidRecord(f"sampling.temperature must be >= 0, got {s.temperature}")
    if s.HasField("top_p") and not 0 < s.top_p <= 1:
        raise InvalidRecord(f"sampling.top_p must be in (0, 1], got {s.top_p}")
    if not p.id:
        p.id = ids.prompt_id(
            p.text,
            [(m.role, m.content) for m in p.messages],
            p.system_prompt if p.HasField("system_prompt") else None,
            p.round,
        )


def _group(g: CompletionGroup) -> None:
    if not g.prompt_id:
        raise InvalidRecord("completion group has no prompt_id")
    if not g.completions:
        raise InvalidRecord("completion group has no completions")
    if not g.id:
        g.id = ids.group_id(g.prompt_id, g.policy_version)


def _scored(s: ScoredGroup) -> None:
    _group(s.group)
    if len(s.scores) != len(s.group.completions):
        raise InvalidRecord(f"{len(s.scores)} scores for {len(s.group.completions)} completions")
    if not s.id:
        s.id = ids.scored_id(s.group.id, s.judge_id)


def _pair(p: PreferencePair) -> None:
    if p.chosen == p.rejected:
        raise InvalidRecord("pair's chosen and rejected are the same text")
    if not p.id:
        p.id = ids.pair_id(
            p.prompt_id, p.policy_version, p.chosen_index, p.rejected_index, p.judge_id
        )


def _policy(u: PolicyUpdate) -> None:
    if u.version < 1:
        raise InvalidRecord(f"policy version must be >= 1, got {u.version}")
    if not (u.adapter_uri or u.checkpoint_uri):
        raise InvalidRecord("policy update has neither adapter_uri nor checkpoint_uri")
    if not u.id:
        u.id = ids.policy_id(u.version)


def _round_plan(p: RoundPlan) -> None:
    if p.round < 1:
        raise InvalidRecord(f"round must be >= 1, got {p.round}")
    for r in p.ranges:
        if not 0 <= r.start <= r.end:
            raise InvalidRecord(f"range of partition {r.partition} is [{r.start}, {r.end})")
    if not p.id:
        p.id = ids.round_plan_id(p.round, p.seq)


def _eval_result(e: EvalResult) -> None:
    if e.version < 0:
        raise InvalidRecord(f"evaluated version must be >= 0, got {e.version}")
    if not e.id:
        e.id = ids.eval_id(e.version)


def _dead_letter(d: DeadLetter) -> None:
    if not d.id:
        d.id = ids.dead_letter_id(d.source_topic, d.partition, d.offset)


_VALIDATORS: dict[str, Callable[[Message], None]] = {
    Prompt.DESCRIPTOR.full_name: _prompt,
    CompletionGroup.DESCRIPTOR.full_name: _group,
    ScoredGroup.DESCRIPTOR.full_name: _scored,
    PreferencePair.DESCRIPTOR.full_name: _pair,
    PolicyUpdate.DESCRIPTOR.full_name: _policy,
    DeadLetter.DESCRIPTOR.full_name: _dead_letter,
    RoundPlan.DESCRIPTOR.full_name: _round_plan,
    EvalResult.DESCRIPTOR.full_name: _eval_result,
}


def model_input(prompt: Prompt) -> list[dict[str, str]] | str:
    """The prompt exactly as the policy sees it when sampling.

    A chat prompt is its turns, with the system prompt first unless the chat brings its own
    system turn (chat completions, the model's chat template); a raw-text prompt is its text,
    with the system prompt before it (plain completions). The sampler sends this and the
    trainer trains on it, so every pair is scored under the context that produced it.
    """
    system = prompt.system_prompt if prompt.HasField("system_prompt") else ""
    if prompt.messages:
        turns = [{"role": t.role, "content": t.content} for t in prompt.messages]
        if system and not any(t["role"] == "system" for t in turns):
            turns.insert(0, {"role": "system", "content": system})
        return turns
    return f"{system}\n\n{prompt.text}" if system else prompt.text


def chat_turns(prompt: Prompt) -> list[dict[str, str]]:
    """The prompt as a conversation, for judges that need one (reward models, LLM judges):
    :func:`model_input`, with a raw-text prompt as one user turn after its system prompt."""
    if prompt.messages:
        return model_input(prompt)  # type: ignore[return-value]
    turns = []
    if prompt.HasField("system_prompt") and prompt.system_prompt:
        turns.append({"role": "system", "content": prompt.system_prompt})
    turns.append({"role": "user", "content": prompt.text})
    return turns


def trl_preference(pair: PreferencePair, conversational: bool = False) -> dict[str, Any]:
    """The pair's ``prompt``/``chosen``/``rejected`` in TRL's preference format.

    The prompt is :func:`model_input`, so a chat prompt gives the conversational format and a
    raw-text prompt the standard (string) one; ``conversational=True`` turns raw text into one
    user turn (:func:`chat_turns`), for a dataset that must hold a single format.
    """
    prompt = model_input(pair.prompt)
    if conversational and isinstance(prompt, str):
        prompt = chat_turns(pair.prompt)
    if isinstance(prompt, str):
        return {"prompt": prompt, "chosen": pair.chosen, "rejected": pair.rejected}
    return {
        "prompt": prompt,
        "chosen": [{"role": "assistant", "content": pair.chosen}],
        "rejected": [{"role": "assistant", "content": pair.rejected}],
    }


def validate(message: Message) -> Message:
    """Check ``message`` in place (raising :class:`InvalidRecord`), fill its id, return it."""
    _VALIDATORS[message.DESCRIPTOR.full_name](message)
    return message


def record_id(message: Message) -> str:
    """The record's deterministic id, which is also its Kafka key."""
    validate(message)
    return message.id  # type: ignore[attr-defined]
