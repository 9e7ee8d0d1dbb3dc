"""The evaluator's per-version statistics and the regression guard's verdicts."""

from __future__ import annotations

import math
import statistics

import pytest

from onpolicy import messages as m
from onpolicy_trainer.evaluation import (
    PROMOTED,
    REJECTED,
    UNGUARDED,
    _PromptScores,
    _Version,
    judge,
    summarize,
)
from onpolicy_trainer.pairs import admit
from onpolicy_trainer.settings import EvaluationSettings


def version(prompts: dict[str, tuple[list[float], str]]) -> _Version:
    seen = _Version(first_seen=0.0, judge_id="j")
    for pid, (scores, label) in prompts.items():
        seen.prompts[pid] = _PromptScores(
            label=label, scores=scores, finished=sum(s > 0.5 for s in scores), tokens=[10, 20]
        )
    return seen


def result(v: int, mean: float, se: float, verdict: str = "") -> m.EvalResult:
    return m.EvalResult(version=v, mean=mean, se=se, verdict=verdict)


def test_summary_takes_the_standard_error_over_prompts_not_samples():
    seen = version({"a": ([1.0, 0.0], "x"), "b": ([1.0, 1.0], "x"), "c": ([0.0, 0.0], "y")})
    out = summarize(3, seen, expected=4, complete=False)
    per_prompt = [0.5, 1.0, 0.0]
    assert out.id == "eval-v3" and out.version == 3
    assert out.mean == pytest.approx(0.5)
    assert out.se == pytest.approx(statistics.stdev(per_prompt) / math.sqrt(3))
    assert (out.prompts, out.expected, out.samples, out.complete) == (3, 4, 6, False)
    assert out.finished_rate == pytest.approx(3 / 6)
    assert out.mean_tokens == pytest.approx(15.0)
    labels = {s.label: (s.prompts, s.mean) for s in out.labels}
    assert labels == {"x": (2, pytest.approx(0.75)), "y": (1, pytest.approx(0.0))}


def test_the_first_version_is_the_baseline():
    first = result(0, 0.4, 0.05)
    judge(first, [], EvaluationSettings())
    assert first.verdict == PROMOTED and first.best_version == 0


def test_a_drop_beyond_the_margin_is_rejected_and_within_it_promoted():
    settings = EvaluationSettings(margin_se=2.0)
    earlier = [result(0, 0.50, 0.03, PROMOTED), result(1, 0.60, 0.03, PROMOTED)]
    gap = math.sqrt(0.03**2 + 0.03**2)
    worse = result(2, 0.60 - 2.1 * gap, 0.03)
    judge(worse, earlier, settings)
    assert worse.verdict == REJECTED
    assert (worse.best_version, worse.best_mean) == (1, pytest.approx(0.60))
    close = result(2, 0.60 - 1.9 * gap, 0.03)
    judge(close, earlier, settings)
    assert close.verdict == PROMOTED


def test_a_rejected_version_is_never_the_best_to_beat():
    earlier = [result(0, 0.5, 0.01, PROMOTED), result(1, 0.9, 0.01, REJECTED)]
    nxt = result(2, 0.49, 0.01)
    judge(nxt, earlier, EvaluationSettings(margin_se=2.0))
    assert nxt.best_version == 0 and nxt.verdict == PROMOTED


def test_guard_off_only_records():
    earlier = [result(0, 0.9, 0.01, UNGUARDED)]
    nxt = result(1, 0.1, 0.01)
    judge(nxt, earlier, EvaluationSettings(guard=False))
    assert nxt.verdict == UNGUARDED and nxt.best_version == 0


def test_a_pair_of_a_held_out_prompt_is_never_trained():
    pair = m.PreferencePair(
        id="p",
        prompt=m.Prompt(text="q", dataset_split="eval"),
        prompt_token_ids=[1],
        chosen_token_ids=[2],
        rejected_token_ids=[3],
    )
    assert admit(pair, 0, 0, set()) == "held_out"
