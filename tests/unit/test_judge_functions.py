"""Function judges: the built-ins, user functions, weights and the library entry point."""

from __future__ import annotations

import asyncio
import sys
import time
import types

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from onpolicy import messages as m
from onpolicy.serde import InvalidRecord
from onpolicy_judge import JudgeSettings, build_judge, functions
from onpolicy_judge.functions import CombinedScorer

RAMBLE = (
    "The capital of France is Paris. Paris is the capital of France. "
    "The capital of France is Paris. Paris is the capital of France. " * 4
)
SHORT = "Paris is the capital of France."


def comp(text: str, finish: str = "stop", tokens: int = 0, index: int = 0) -> m.Completion:
    return m.Completion(index=index, text=text, finish_reason=finish, num_tokens=tokens)


def group(*completions: m.Completion, split: str = "train", **prompt) -> m.CompletionGroup:
    prompt.setdefault("text", "What is the capital of France?")
    return m.CompletionGroup(
        prompt_id="p1",
        prompt=m.Prompt(id="p1", dataset_split=split, **prompt),
        completions=completions,
        policy_version=3,
    )


def test_concise_prefers_short_finished_non_repetitive_answers():
    short = functions.concise(comp(SHORT))
    rambling = functions.concise(comp(RAMBLE, tokens=128))
    truncated = functions.concise(comp(SHORT, finish="length"))
    assert short == pytest.approx(1.0)
    assert rambling < 0.5 < short
    assert truncated == pytest.approx(0.5 * short)
    assert functions.concise(comp("   ")) == 0.0


def test_repeated_lines_are_penalised_even_without_repeated_ngrams():
    lines = "\n".join(["- buy milk"] * 5)
    assert functions.repetition_ratio(lines) == pytest.approx(0.8)
    assert functions.repetition_score(comp(lines)) == pytest.approx(0.2)


def test_length_uses_token_count_when_known():
    assert functions.length_score(comp("x", tokens=128), target_tokens=64) == 0.5
    assert functions.length_score(comp("one two three"), target_tokens=64) == 1.0


def test_exact_match_and_regex_against_the_reference_answer():
    p = m.Prompt(text="2+2?", reference_answer="4")
    assert functions.exact_match(comp(" 4. "), p) == 1.0
    assert functions.exact_match(comp("It is 4"), p) == 0.0
    assert functions.exact_match(comp("It is 4"), p, contains=True) == 1.0
    assert functions.regex(comp("answer: 4"), m.Prompt(text="x", reference_answer=r"\b4\b")) == 1.0
    assert functions.regex(comp("answer: 44"), m.Prompt(text="x", reference_answer=r"\b4\b")) == 0.0
    assert functions.regex(comp("YES"), p, pattern="^yes$") == 1.0
    with pytest.raises(InvalidRecord, match="reference_answer"):
        functions.exact_match(comp("4"), m.Prompt(text="2+2?"))
    with pytest.raises(InvalidRecord, match="is invalid or not supported"):
        functions.regex(comp("4"), p, pattern="(")


def test_regex_is_linear_time_on_a_catastrophic_backtracking_pattern():
    # Python's re takes exponential time here (2**40 ways to split the a's before failing).
    evil = m.Prompt(text="x", reference_answer="(a+)+$")
    started = time.perf_counter()
    assert functions.regex(comp("a" * 40 + "b"), evil) == 0.0
    assert functions.regex(comp("a" * 100_000 + "b"), evil) == 0.0
    assert functions.regex(comp("b" + "a" * 40), evil) == 1.0
    assert time.perf_counter() - started < 1.0


@pytest.mark.parametrize("pattern", [r"(a)\1", r"(?<=a)b", r"a(?!b)", "x" * 5000])
def test_regex_patterns_re2_cannot_run_are_invalid_records(pattern):
    with pytest.raises(InvalidRecord, match="regex scorer"):
        functions.regex(comp("aab"), m.Prompt(text="x", reference_answer=pattern))


def test_regex_case_sensitivity_is_an_option():
    p = m.Prompt(text="x", reference_answer="^Yes")
    assert functions.regex(comp("yes, indeed"), p) == 1.0
    assert functions.regex(comp("yes, indeed"), p, ignore_case=False) == 0.0


def user_scorer(completion: m.Completion, prompt: m.Prompt, *, bonus: float = 0.0) -> float:
    return min(1.0, completion.text.count("!") / 3 + bonus)


def test_user_function_by_module_path_and_weights():
    module = types.ModuleType("judge_user_fns")
    module.excited = user_scorer  # type: ignore[attr-defined]
    sys.modules["judge_user_fns"] = module
    try:
        scorer = CombinedScorer.from_specs(
            [
                {"name": "finished", "weight": 1.0},
                {"name": "judge_user_fns:excited", "weight": 3.0, "params": {"bonus": 0.0}},
            ]
        )
        assert scorer(comp("wow!!!")) == pytest.approx((1 * 1.0 + 3 * 1.0) / 4)
        assert scorer(comp("wow", finish="length")) == pytest.approx(0.0)
        assert scorer(comp("wow!", finish="length")) == pytest.approx(3 * (1 / 3) / 4)
        assert scorer.judge_id.startswith("fn:finished+judge_user_fns:excited*3[")
    finally:
        del sys.modules["judge_user_fns"]


def test_unknown_scorer_names_the_built_ins():
    with pytest.raises(ValueError, match="concise"):
        functions.resolve("nope")
    with pytest.raises(ValueError, match="cannot load"):
        functions.resolve("no_such_module_xyz:f")


def test_non_finite_score_is_an_error():
    scorer = functions.WeightedScorer("nan", lambda c, p: float("nan"))
    with pytest.raises(ValueError, match="nan"):
        scorer(comp("x"), None)


@settings(max_examples=60, deadline=None)
@given(
    text=st.text(max_size=400),
    finish=st.sampled_from(["stop", "length", ""]),
    tokens=st.integers(0, 2000),
)
def test_builtin_scores_are_deterministic_and_within_unit_interval(text, finish, tokens):
    c = comp(text, finish=finish, tokens=tokens)
    for name in ("concise", "length", "repetition", "finished"):
        value = functions.BUILTINS[name](c, None)
        assert 0.0 <= value <= 1.0
        assert functions.BUILTINS[name](c, None) == value


def test_build_judge_default_is_concise_and_scores_a_group():
    judge = build_judge(JudgeSettings())
    assert judge.judge_id == "fn:concise"
    g = group(comp(SHORT, index=0), comp(RAMBLE, finish="length", tokens=128, index=1))
    scored = asyncio.run(judge.score(g))
    assert scored.judge_id == "fn:concise"
    assert scored.id and scored.group.id
    assert scored.scores[0] > scored.scores[1]
    pairs = judge.pairs(scored)
    assert [(p.chosen_index, p.rejected_index) for p in pairs] == [(0, 1)]
    assert pairs[0].policy_version == 3 and pairs[0].scored_id == scored.id
    m.validate(pairs[0])


def test_unusable_groups_raise_invalid_record():
    judge = build_judge(JudgeSettings())
    no_prompt = m.CompletionGroup(prompt_id="p", completions=[comp("a")])
    with pytest.raises(InvalidRecord, match="no prompt"):
        asyncio.run(judge.score(no_prompt))
    dup = group(comp("a", index=0), comp("b", index=0))
    with pytest.raises(InvalidRecord, match="unique"):
        asyncio.run(judge.score(dup))
    exact = build_judge(JudgeSettings(functions=[{"name": "exact_match"}]))
    with pytest.raises(InvalidRecord, match="reference_answer"):
        asyncio.run(exact.score(group(comp("a"), comp("b", index=1))))
