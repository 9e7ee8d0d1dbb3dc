"""The peers benchmark's pure parts: its pair rule is the judge service's, its ratios."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from benchmarks.bench_peers import (
    SYSTEMS,
    Config,
    Group,
    aggregate,
    best_worst,
    gain_per_minute,
    pair_budget,
    ratio,
    resumed_runs,
    round_ends,
)
from onpolicy import messages as m
from onpolicy_judge.pairs import build_pairs
from onpolicy_judge.settings import PairSettings


@st.composite
def groups(draw) -> Group:
    n = draw(st.integers(1, 6))
    scores = draw(st.lists(st.sampled_from([0.0, 0.5, 0.5, 1.0]), min_size=n, max_size=n))
    texts = draw(st.lists(st.sampled_from(["a", "b", "c"]), min_size=n, max_size=n))
    finish = draw(st.lists(st.sampled_from(["stop", "length"]), min_size=n, max_size=n))
    return Group(texts, finish, scores)


@given(groups())
def test_the_pair_rule_is_the_judge_services_default(g: Group) -> None:
    scored = m.ScoredGroup(
        id="s",
        group=m.CompletionGroup(
            id="g",
            prompt_id="p",
            prompt=m.Prompt(id="p", text="q", dataset_split="train"),
            completions=[
                m.Completion(index=i, text=t, finish_reason=f)
                for i, (t, f) in enumerate(zip(g.texts, g.finish, strict=True))
            ],
        ),
        scores=g.scores,
        judge_id="j",
    )
    pairs = build_pairs(scored, PairSettings()).pairs
    expected = [(p.chosen_index, p.rejected_index) for p in pairs]
    got = best_worst(g)
    assert ([got] if got else []) == expected


def test_ratios() -> None:
    assert ratio(2.0, 1.0) == 2.0
    assert ratio(1.0, 0.0) is None and ratio(1.0, -0.5) is None and ratio(None, 1.0) is None
    assert gain_per_minute(0.4, 0.6, 120.0) == pytest.approx(0.1)


def _system(wall: float, before: float, after: float) -> dict:
    return {
        "wall_s": wall,
        "pairs": 48,
        "eval_before": before,
        "eval_after": after,
        "gain": after - before,
        "gain_per_minute": gain_per_minute(before, after, wall),
    }


def test_aggregate_fields_and_ratios() -> None:
    runs = [
        {
            "onpolicy": _system(300.0, 0.4, 0.6),
            "script": _system(290.0, 0.4, 0.55),
            "online_dpo": _system(200.0, 0.4, 0.45),
        },
        {
            "onpolicy": _system(320.0, 0.4, 0.6),
            "script": _system(310.0, 0.4, 0.55),
            "online_dpo": _system(200.0, 0.4, 0.45),
        },
    ]
    out = aggregate({"rounds": 2}, runs)
    for name in SYSTEMS:
        for key in ("wall_s", "pairs", "eval_before", "eval_after", "gain_per_minute"):
            assert out["systems"][name][key] is not None
        assert out["systems"][name]["runs"] == 2
    on = out["systems"]["onpolicy"]
    assert on["wall_s"] == 310.0 and on["spread"]["wall_s"]["min"] == 300.0
    gpm_on = statistics_mean([0.2 / 5, 0.2 / (320 / 60)])
    assert out["gain_per_minute_vs_online_dpo"] == pytest.approx(gpm_on / (0.05 / (200 / 60)))
    assert out["wall_vs_script"] == pytest.approx(310.0 / 300.0)
    assert out["goals"]["wall_vs_script<=1.05"] is True
    assert len(out["ratios_per_repeat"]) == 2


def test_a_failed_system_leaves_the_ratio_empty() -> None:
    runs = [{"onpolicy": _system(300.0, 0.4, 0.6), "script": {"error": "boom"}}]
    out = aggregate({}, runs)
    assert out["wall_vs_script"] is None
    assert out["systems"]["script"]["error"] == ["boom"]
    assert out["goals"]["wall_vs_script<=1.05"] is None


def statistics_mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _cfg(rounds: int = 3, ppr: int = 24) -> Config:
    return Config(
        rounds=rounds,
        prompts_per_round=ppr,
        num_samples=4,
        max_tokens=64,
        temperature=1.0,
        eval_temperature=0.7,
        eval_samples=4,
        final_samples=4,
        eval_size=48,
        learning_rate=3e-3,
        loss_types=["sigmoid", "sft"],
        beta=0.1,
        batch_size=2,
        max_length=256,
        lora_r=8,
        lora_alpha=16,
        lora_dropout=0.0,
        target_modules=["q_proj"],
    )


def test_the_peers_train_as_many_pairs_per_round_as_onpolicy_did() -> None:
    cfg = _cfg()
    assert pair_budget(cfg, {"pairs_per_round": [25, 36, 35]}) == [25, 36, 35]
    # Without a whole onpolicy run in this repeat: the planned size.
    for onpolicy in (None, {"error": "boom"}, {"pairs_per_round": [25, 36]}):
        assert pair_budget(cfg, onpolicy) == [24, 24, 24]
    assert pair_budget(cfg, {"pairs_per_round": [25, 0, 35]}) == [24, 24, 24]


def test_online_dpo_rounds_end_where_their_pairs_fill_a_batch() -> None:
    assert round_ends([25, 36, 35], 2) == [13, 31, 48]
    assert round_ends([24, 24, 24], 2) == [12, 24, 36]
    assert round_ends([4], 4) == [1]


def _done(rep: int) -> dict:
    return {"repeat": rep} | {n: {"eval_after": 0.3, "wall_s": 100.0} for n in SYSTEMS}


def test_resume_keeps_finished_repeats_and_reruns_the_one_cut_in_the_middle() -> None:
    cut = _done(2)
    del cut["online_dpo"]
    partial = {"size": {"rounds": 3, "prompts_per_round": 40}, "repeats": [_done(0), _done(1), cut]}
    kept = resumed_runs(partial, {"rounds": 3, "prompts_per_round": 40}, list(SYSTEMS))
    assert [r["repeat"] for r in kept] == [0, 1]
    # A failed system is not finished either.
    failed = _done(0) | {"script": {"error": "boom"}}
    assert resumed_runs({"repeats": [failed, _done(1)]}, {}, list(SYSTEMS)) == []
    # Only the systems this run asks for count.
    assert resumed_runs({"repeats": [cut]}, {}, ["onpolicy", "script"]) == [cut]


def test_resume_refuses_a_partial_run_of_another_size() -> None:
    partial = {"size": {"rounds": 2, "prompts_per_round": 40}, "repeats": [_done(0)]}
    with pytest.raises(ValueError, match="rounds"):
        resumed_runs(partial, {"rounds": 3, "prompts_per_round": 40}, list(SYSTEMS))
