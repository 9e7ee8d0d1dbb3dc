"""Checkable instruction constraints (IFEval-style): a judge a person can verify by eye.

A prompt names its constraints in ``metadata["constraints"]``, ``;``-separated, each
``kind`` or ``kind=argument``::

    {"messages": [{"role": "user", "content": "Why is the sky blue? Answer in at most 20
     words. Use the word \\"light\\" in your answer."}],
     "metadata": {"constraints": "max_words=20;include=light"}}

:func:`instructions` scores 1 when the answer ended (not cut off at ``max_tokens``) and meets
every constraint, else 0, so the held-out mean reward is the pass rate. The ``include``
constraint names a content word of the question, which keeps answers on the question's topic:
a short non-answer passes a length rule but not that one.

``mentions=nile|egypt`` is the answer's content: the answer names at least one of the
reference terms (words a right answer uses and the question does not). It is a gate, not one
constraint among others: an answer without any of them scores 0 however well it follows the
format, since in the demo's runs a policy judged on format alone learned to answer "Which major
river flows through Cairo? Begin with Sure" with "Sure." and "Name three noble gases" with
"noble gases".
"""

from __future__ import annotations

import re
from collections.abc import Callable

from onpolicy import messages as m
from onpolicy.serde import InvalidRecord

_WORDS = re.compile(r"[A-Za-z0-9']+")
_BULLET = re.compile(r"^\s*[-*•]\s+\S")
# Quotes and closing punctuation a model may put after the last word.
_TRAILING = " \t\n.!?;:,\"')]*"


def words(text: str) -> list[str]:
    return _WORDS.findall(text)


def lowercase(text: str, arg: str) -> bool:
    """Letters, none of them capital."""
    return any(c.isalpha() for c in text) and not any(c.isupper() for c in text)


def max_words(text: str, arg: str) -> bool:
    """At least one word and at most ``arg`` words."""
    return 0 < len(words(text)) <= int(arg)


def include(text: str, arg: str) -> bool:
    """The word ``arg`` (or its plural), case ignored, as a whole word."""
    return re.search(rf"\b{re.escape(arg)}(s|es)?\b", text, re.IGNORECASE) is not None


def mentions(text: str, arg: str) -> bool:
    """At least one of the ``|``-separated terms (or a plural), case ignored, as whole words."""
    return any(include(text, term) for term in arg.split("|") if term.strip())


def bullets(text: str, arg: str) -> bool:
    """Exactly ``arg`` lines that are bullet points (``-``, ``*`` or ``•``)."""
    return sum(bool(_BULLET.match(line)) for line in text.splitlines()) == int(arg)


def end_with(text: str, arg: str) -> bool:
    """The last words are ``arg`` (case, closing punctuation and quotes ignored)."""
    tail = text.rstrip(_TRAILING).casefold()
    return tail.endswith(arg.casefold().rstrip(_TRAILING)) and bool(tail)


def start_with(text: str, arg: str) -> bool:
    """The first word is ``arg`` (case and leading punctuation ignored)."""
    found = words(text)
    return bool(found) and found[0].casefold() == arg.casefold()


def no_commas(text: str, arg: str) -> bool:
    return bool(text.strip()) and "," not in text


def quoted(text: str, arg: str) -> bool:
    """The whole answer is inside double quotation marks."""
    t = text.strip()
    return len(t) > 2 and t[0] in '"“' and t[-1] in '"”'


CHECKS: dict[str, Callable[[str, str], bool]] = {
    "lowercase": lowercase,
    "max_words": max_words,
    "include": include,
    "mentions": mentions,
    "bullets": bullets,
    "end_with": end_with,
    "start_with": start_with,
    "no_commas": no_commas,
    "quoted": quoted,
}
# Kinds whose argument must be a positive integer; the others' must not be empty (below).
_INT_ARG = {"max_words", "bullets"}
_NO_ARG = {"lowercase", "no_commas", "quoted"}
# Kinds that gate the score (0 unless met) instead of counting as one share of it.
GATES = {"mentions"}


def parse(spec: str) -> list[tuple[str, str]]:
    """``"max_words=20;include=light"`` as ``[("max_words", "20"), ("include", "light")]``."""
    out = []
    for item in filter(None, (part.strip() for part in spec.split(";"))):
        kind, _, arg = (s.strip() for s in item.partition("="))
        if kind not in CHECKS:
            raise InvalidRecord(f"constraint {kind!r} is unknown; known: {sorted(CHECKS)}")
        if kind in _INT_ARG and not (arg.isdigit() and int(arg) > 0):
            raise InvalidRecord(f"constraint {kind!r} needs a positive whole number, got {arg!r}")
        if kind not in _INT_ARG | _NO_ARG and not arg.strip("| "):
            raise InvalidRecord(f"constraint {kind!r} needs an argument ({kind}=...)")
        out.append((kind, arg))
    if not out:
        raise InvalidRecord("the prompt's metadata 'constraints' names no constraint")
    return out


def prompt_constraints(prompt: m.Prompt | None) -> list[tuple[str, str]]:
    if prompt is None or "constraints" not in prompt.metadata:
        raise InvalidRecord("scorer 'instructions' needs the prompt's metadata 'constraints'")
    return parse(prompt.metadata["constraints"])


def results(text: str, constraints: list[tuple[str, str]]) -> list[bool]:
    """Each constraint met or not, in order."""
    return [CHECKS[kind](text, arg) for kind, arg in constraints]


def echoes(text: str, prompt: m.Prompt) -> bool:
    """The answer repeats a sentence of the prompt of 4 words or more (case ignored)."""
    said = " ".join(words(text)).casefold()
    asked = prompt.messages[-1].content if prompt.messages else prompt.text
    sentences = re.split(r"(?<=[.?!])\s+", asked)
    return any(
        len(w := words(sentence)) >= 4 and " ".join(w).casefold() in said for sentence in sentences
    )


def instructions(
    completion: m.Completion,
    prompt: m.Prompt | None = None,
    *,
    partial: bool = False,
    require_finished: bool = True,
    no_echo: bool = False,
) -> float:
    """1 when the answer meets every constraint of its prompt, else 0.

    ``partial``: the share of constraints met instead (a graded signal, no longer a pass
    rate). ``require_finished``: an answer cut off at the token limit scores 0, since a
    person would not call half an answer one that follows the instructions. ``no_echo``:
    an answer that repeats a sentence of the prompt scores 0 (in the demo's pilots the
    policy learned to pass "Use the word X" and "no commas" by echoing the question).
    A gate (``mentions``) that fails scores 0; the other constraints make the score.
    """
    constraints = prompt_constraints(prompt)
    if require_finished and completion.finish_reason == "length":
        return 0.0
    if no_echo and echoes(completion.text, prompt):
        return 0.0
    if not all(CHECKS[kind](completion.text, arg) for kind, arg in constraints if kind in GATES):
        return 0.0
    checks = results(completion.text, [(k, a) for k, a in constraints if k not in GATES])
    if not checks:
        return 1.0
    if partial:
        return sum(checks) / len(checks)
    return 1.0 if all(checks) else 0.0
