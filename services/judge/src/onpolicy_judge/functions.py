"""Function judges: deterministic scorers of one completion, usable as a library.

A scorer is ``fn(completion: Completion, prompt: Prompt, **params) -> float``. Built-ins are
in :data:`BUILTINS`; any importable ``module:function`` with that signature works too.
Several scorers combine into one score by their weights (:class:`CombinedScorer`).

The demo's judge is ``instructions`` (:mod:`onpolicy_judge.constraints`): checkable
instruction constraints carried by each prompt, scored pass or fail. :func:`concise` rewards
form only (short, non-repetitive, ended): SmolLM2-135M learns it in a few rounds, by giving
shorter answers, right or wrong.
"""

from __future__ import annotations

import functools
import importlib
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import re2

from onpolicy import ids
from onpolicy import messages as m
from onpolicy.serde import InvalidRecord
from onpolicy_judge.constraints import instructions

Scorer = Callable[..., float]

_TOKEN = re.compile(r"\w+|[^\w\s]")
_WORD = re.compile(r"\w+")


def approx_tokens(completion: m.Completion) -> int:
    """The completion's token count, or an estimate (words and punctuation) when unknown."""
    if completion.num_tokens > 0:
        return completion.num_tokens
    return len(_TOKEN.findall(completion.text))


def length_score(
    completion: m.Completion, prompt: m.Prompt | None = None, *, target_tokens: int = 64
) -> float:
    """1 up to ``target_tokens``, then ``target/n``: twice the target scores 0.5. Empty: 0."""
    if not completion.text.strip():
        return 0.0
    n = approx_tokens(completion)
    return 1.0 if n <= target_tokens else target_tokens / n


def repetition_ratio(text: str, ngram: int = 3) -> float:
    """Share of repeated content in ``text``: the larger of repeated word n-grams and lines."""
    words = [w.casefold() for w in _WORD.findall(text)]
    grams = [tuple(words[i : i + ngram]) for i in range(len(words) - ngram + 1)]
    gram_rep = 1.0 - len(set(grams)) / len(grams) if grams else 0.0
    lines = [line.strip().casefold() for line in text.splitlines() if line.strip()]
    line_rep = 1.0 - len(set(lines)) / len(lines) if len(lines) > 1 else 0.0
    return max(gram_rep, line_rep)


def repetition_score(
    completion: m.Completion, prompt: m.Prompt | None = None, *, ngram: int = 3
) -> float:
    """1 for text without repeated n-grams or lines, falling to 0 as repeats take over."""
    if not completion.text.strip():
        return 0.0
    return 1.0 - repetition_ratio(completion.text, ngram)


def finished(completion: m.Completion, prompt: m.Prompt | None = None) -> float:
    """1 when the completion ended on EOS or a stop string, 0 when cut off."""
    return 1.0 if completion.finish_reason == "stop" else 0.0


def concise(
    completion: m.Completion,
    prompt: m.Prompt | None = None,
    *,
    target_tokens: int = 64,
    ngram: int = 3,
    length_weight: float = 0.5,
    repetition_weight: float = 0.5,
    truncated_factor: float = 0.5,
) -> float:
    """The demo's judge, in [0, 1]: short, non-repetitive and ended properly.

    A weighted mean of :func:`length_score` and :func:`repetition_score`, multiplied by
    ``truncated_factor`` when the completion hit the token limit (finish_reason "length").
    """
    if not completion.text.strip():
        return 0.0
    mean = (
        length_weight * length_score(completion, target_tokens=target_tokens)
        + repetition_weight * repetition_score(completion, ngram=ngram)
    ) / (length_weight + repetition_weight)
    if completion.finish_reason == "length":
        mean *= truncated_factor
    return mean


def _normalise(text: str) -> str:
    return re.sub(r"\s+", " ", text.casefold()).strip().strip(".!?;:,").strip()


def _reference(prompt: m.Prompt | None, scorer: str) -> str:
    if prompt is None or not prompt.HasField("reference_answer"):
        raise InvalidRecord(f"scorer {scorer!r} needs the prompt's reference_answer; it has none")
    return prompt.reference_answer


def exact_match(
    completion: m.Completion, prompt: m.Prompt | None = None, *, contains: bool = False
) -> float:
    """1 when the answer equals the reference (case, spacing, end punctuation ignored).

    With ``contains``, 1 when the normalised reference occurs anywhere in the answer.
    """
    reference = _normalise(_reference(prompt, "exact_match"))
    answer = _normalise(completion.text)
    return 1.0 if (reference in answer if contains else reference == answer) else 0.0


# Patterns come with records (``reference_answer``) and run on the judge's event loop, so
# they go to RE2, which matches in time linear in the text whatever the pattern: no pattern can
# backtrack catastrophically. RE2 refuses what needs backtracking (backreferences,
# lookaround); such a pattern is an invalid record, never run by another engine.
# Unlike Python's re, ``$`` matches only at the very end (no trailing-newline special case).
MAX_PATTERN_CHARS = 4096


@functools.lru_cache(maxsize=1024)
def compile_pattern(source: str, ignore_case: bool = True) -> Any:
    """``source`` compiled by RE2; InvalidRecord when RE2 cannot run it in linear time."""
    if len(source) > MAX_PATTERN_CHARS:
        raise InvalidRecord(
            f"regex scorer: pattern of {len(source)} characters (at most {MAX_PATTERN_CHARS})"
        )
    options = re2.Options()
    options.case_sensitive = not ignore_case
    options.log_errors = False  # the reason goes into the dead letter, not to stderr
    try:
        return re2.compile(source, options)
    except re2.error as exc:
        reason = exc.args[0] if exc.args else exc
        if isinstance(reason, bytes):
            reason = reason.decode("utf-8", "replace")
        raise InvalidRecord(
            f"regex scorer: pattern {source[:200]!r} is invalid or not supported by the "
            f"linear-time engine RE2 (no backreferences or lookaround): {reason}"
        ) from exc


def regex(
    completion: m.Completion,
    prompt: m.Prompt | None = None,
    *,
    pattern: str | None = None,
    ignore_case: bool = True,
) -> float:
    """1 when ``pattern`` (default: the prompt's reference_answer) matches the answer.

    Matching uses RE2 (linear time): a pattern RE2 cannot run (backreferences, lookaround)
    or a malformed one makes the record invalid (dead-lettered with the reason).
    """
    source = pattern if pattern is not None else _reference(prompt, "regex")
    compiled = compile_pattern(source, ignore_case)
    return 1.0 if compiled.search(completion.text) else 0.0


BUILTINS: dict[str, Scorer] = {
    "instructions": instructions,
    "concise": concise,
    "length": length_score,
    "repetition": repetition_score,
    "finished": finished,
    "exact_match": exact_match,
    "regex": regex,
}


def resolve(name: str) -> Scorer:
    """A built-in by name, or ``module:function`` imported."""
    if ":" in name:
        module_name, _, attr = name.partition(":")
        try:
            fn = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as exc:
            raise ValueError(f"cannot load scorer {name!r}: {exc}") from exc
        if not callable(fn):
            raise ValueError(f"scorer {name!r} is not callable")
        return fn
    try:
        return BUILTINS[name]
    except KeyError:
        raise ValueError(
            f"unknown scorer {name!r}; built-ins are {sorted(BUILTINS)}, or use module:function"
        ) from None


@dataclass
class WeightedScorer:
    name: str
    fn: Scorer
    weight: float = 1.0
    params: dict[str, Any] = field(default_factory=dict)

    def __call__(self, completion: m.Completion, prompt: m.Prompt | None) -> float:
        value = float(self.fn(completion, prompt, **self.params))
        if not math.isfinite(value):
            raise ValueError(f"scorer {self.name!r} returned {value}")
        return value


class CombinedScorer:
    """The weighted mean of several scorers."""

    def __init__(self, scorers: Sequence[WeightedScorer]):
        if not scorers:
            raise ValueError("at least one scorer is needed")
        self.scorers = list(scorers)
        self.total_weight = sum(s.weight for s in self.scorers)

    @classmethod
    def from_specs(cls, specs: Sequence[Any]) -> CombinedScorer:
        """From :class:`~onpolicy_judge.settings.ScorerSpec` objects (or dicts alike)."""
        out = []
        for spec in specs:
            spec = spec if isinstance(spec, dict) else spec.model_dump()
            name = spec["name"]
            out.append(
                WeightedScorer(name, resolve(name), spec.get("weight", 1.0), spec.get("params", {}))
            )
        return cls(out)

    @property
    def judge_id(self) -> str:
        """Names the scorers, weights and options, so pairs of other judges never collide."""
        parts = []
        for s in self.scorers:
            part = s.name if s.weight == 1 else f"{s.name}*{s.weight:g}"
            if s.params:
                part += "[" + ids.digest(s.params, prefix="p", size=4) + "]"
            parts.append(part)
        return "fn:" + "+".join(parts)

    def __call__(self, completion: m.Completion, prompt: m.Prompt | None = None) -> float:
        return sum(s.weight * s(completion, prompt) for s in self.scorers) / self.total_weight

    def score_group(self, group: m.CompletionGroup) -> list[float]:
        return [self(c, group.prompt) for c in group.completions]
