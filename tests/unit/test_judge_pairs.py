"""Pair rules, property-tested: every candidate is kept or dropped for one reason."""

from __future__ import annotations

import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from onpolicy import ids
from onpolicy import messages as m
from onpolicy_judge.metrics import JudgeMetrics
from onpolicy_judge.pairs import build_pairs, length_normalised, ranking_scores
from onpolicy_judge.settings import PairSettings

STRATEGIES = ("best_worst", "best_vs_rest", "all")


@st.composite
def scored_groups(draw) -> m.ScoredGroup:
    n = draw(st.integers(1, 6))
    # Few distinct values make ties and identical texts frequent.
    scores = draw(
        st.lists(st.sampled_from([0.0, 0.25, 0.5, 0.5001, 1.0, 3.0]), min_size=n, max_size=n)
    )
    texts = draw(st.lists(st.sampled_from(["a", "b", "c", "dd", "eee e"]), min_size=n, max_size=n))
    finish = draw(st.lists(st.sampled_from(["stop", "length"]), min_size=n, max_size=n))
    tokens = draw(st.lists(st.integers(0, 300), min_size=n, max_size=n))
    group = m.CompletionGroup(
        id="g1",
        prompt_id="p1",
        prompt=m.Prompt(
            id="p1", text="q", dataset_split=draw(st.sampled_from(["train", "", "eval"]))
        ),
        completions=[
            m.Completion(
                index=10 + i,
                text=t,
                finish_reason=f,
                num_tokens=k,
                token_ids=[100 + i] * min(k, 5) + ([2] if f == "stop" else []),
            )
            for i, (t, f, k) in enumerate(zip(texts, finish, tokens, strict=True))
        ],
        policy_version=7,
        prompt_token_ids=[1, 9690, 198],
    )
    return m.ScoredGroup(id="s1", group=group, scores=scores, judge_id="j")


rules_strategy = st.builds(
    PairSettings,
    strategy=st.sampled_from(STRATEGIES),
    min_margin=st.sampled_from([0.0, 0.1, 0.6]),
    drop_ties=st.booleans(),
    finished=st.sampled_from(["require", "prefer", "off"]),
    max_pairs_per_prompt=st.integers(1, 20),
    length_alpha=st.sampled_from([0.0, 0.5, 1.0]),
)


@settings(max_examples=400, deadline=None)
@given(scored=scored_groups(), rules=rules_strategy)
def test_pair_invariants(scored: m.ScoredGroup, rules: PairSettings):
    result = build_pairs(scored, rules)
    completions = scored.group.completions
    by_index = {c.index: (pos, c) for pos, c in enumerate(completions)}
    adj = ranking_scores(scored, rules)

    if scored.group.prompt.dataset_split == "eval":
        assert result.eval_group and not result.pairs and not result.dropped
        return
    assert len(result.pairs) <= rules.max_pairs_per_prompt
    if len(completions) < 2:
        assert result.dropped == {"single_completion": 1}
        return
    any_finished = any(c.finish_reason == "stop" for c in completions)
    if rules.finished == "require" and not any_finished:
        assert result.dropped == {"none_finished": 1} and not result.pairs
        return
    # Every candidate is accounted for exactly once.
    assert result.candidates == len(result.pairs) + sum(result.dropped.values())
    seen = set()
    for pair in result.pairs:
        c_pos, chosen = by_index[pair.chosen_index]
        r_pos, rejected = by_index[pair.rejected_index]
        assert pair.chosen != pair.rejected
        assert pair.chosen_index != pair.rejected_index
        assert (pair.chosen, pair.rejected) == (chosen.text, rejected.text)
        assert pair.margin >= rules.min_margin
        assert pair.margin >= 0
        assert abs(pair.margin - (adj[c_pos] - adj[r_pos])) < 1e-12
        if rules.drop_ties:
            assert pair.margin > rules.tie_epsilon
        if rules.finished == "require" or (rules.finished == "prefer" and any_finished):
            assert chosen.finish_reason == "stop"
        # The pair carries what was sampled, for the trainer to train exactly that.
        assert list(pair.chosen_token_ids) == list(chosen.token_ids)
        assert list(pair.rejected_token_ids) == list(rejected.token_ids)
        assert list(pair.prompt_token_ids) == list(scored.group.prompt_token_ids)
        assert (pair.chosen_finish_reason, pair.rejected_finish_reason) == (
            chosen.finish_reason,
            rejected.finish_reason,
        )
        assert (pair.chosen_score, pair.rejected_score) == (
            scored.scores[c_pos],
            scored.scores[r_pos],
        )
        assert pair.id == ids.pair_id("p1", 7, pair.chosen_index, pair.rejected_index, "j")
        assert pair.policy_version == 7 and pair.group_id == "g1" and pair.scored_id == "s1"
        m.validate(pair)
        seen.add(frozenset((pair.chosen_index, pair.rejected_index)))
    assert len(seen) == len(result.pairs)  # never the same two answers twice
    if result.dropped["tie"]:
        assert rules.drop_ties and result.ties >= result.dropped["tie"]
        assert any(abs(a - b) <= rules.tie_epsilon for a, b in itertools.combinations(adj, 2))
    # Largest margins are kept first.
    margins = [p.margin for p in result.pairs]
    assert margins == sorted(margins, reverse=True)


@settings(max_examples=200, deadline=None)
@given(scored=scored_groups())
def test_best_worst_pairs_the_extremes(scored: m.ScoredGroup):
    rules = PairSettings(finished="off", drop_ties=True)
    result = build_pairs(scored, rules)
    if scored.group.prompt.dataset_split == "eval" or len(scored.scores) < 2:
        return
    assert result.candidates == 1
    best, worst = max(scored.scores), min(scored.scores)
    if result.pairs:
        assert (result.pairs[0].chosen_score, result.pairs[0].rejected_score) == (best, worst)
    else:
        reason = next(iter(result.dropped))
        assert reason in {"tie", "same_text"}
        assert reason != "tie" or best == worst


def group_of(scores, finish=None, texts=None, split="train"):
    n = len(scores)
    finish = finish or ["stop"] * n
    texts = texts or [f"answer {i}" for i in range(n)]
    g = m.CompletionGroup(
        id="g",
        prompt_id="p",
        prompt=m.Prompt(id="p", text="q", dataset_split=split),
        completions=[
            m.Completion(index=i, text=t, finish_reason=f)
            for i, (t, f) in enumerate(zip(texts, finish, strict=True))
        ],
    )
    return m.ScoredGroup(id="s", group=g, scores=scores, judge_id="j")


def test_ties_dropped_or_kept_as_configured():
    tied = group_of([0.5, 0.5, 0.5])
    assert build_pairs(tied, PairSettings()).dropped == {"tie": 1}
    kept = build_pairs(tied, PairSettings(drop_ties=False))
    assert len(kept.pairs) == 1 and kept.pairs[0].margin == 0 and kept.ties == 1


def test_a_truncated_answer_is_never_chosen():
    scored = group_of([0.9, 0.4, 0.1], finish=["length", "stop", "stop"])
    result = build_pairs(scored, PairSettings())
    assert [(p.chosen_index, p.rejected_index) for p in result.pairs] == [(1, 2)]
    rest = build_pairs(scored, PairSettings(strategy="best_vs_rest", max_pairs_per_prompt=5))
    assert [(p.chosen_index, p.rejected_index) for p in rest.pairs] == [(1, 2)]
    assert rest.dropped == {"chosen_not_eos": 1}
    only_truncated_better = group_of([0.9, 0.4], finish=["length", "stop"])
    assert build_pairs(only_truncated_better, PairSettings()).dropped == {"chosen_not_eos": 1}
    off = build_pairs(scored, PairSettings(finished="off"))
    assert [(p.chosen_index, p.rejected_index) for p in off.pairs] == [(0, 2)]


def test_a_group_where_no_sample_ended_gives_no_pair():
    cut = group_of([0.9, 0.4, 0.1], finish=["length", "length", "length"])
    assert build_pairs(cut, PairSettings()).dropped == {"none_finished": 1}
    assert not build_pairs(cut, PairSettings()).pairs
    # The old behaviour, on request: with none finished, scores decide.
    old = build_pairs(cut, PairSettings(finished="prefer"))
    assert [(p.chosen_index, p.rejected_index) for p in old.pairs] == [(0, 2)]
    assert old.pairs[0].chosen_finish_reason == "length"


def test_all_pairs_min_margin_and_cap_reasons():
    scored = group_of([1.0, 0.8, 0.2, 0.0])
    result = build_pairs(
        scored, PairSettings(strategy="all", min_margin=0.5, max_pairs_per_prompt=2)
    )
    # Margins: (0,3) 1.0, (0,2) 0.8, (1,3) 0.8, (1,2) 0.6, (0,1) 0.2, (2,3) 0.2.
    assert [(p.chosen_index, p.rejected_index) for p in result.pairs] == [(0, 3), (0, 2)]
    assert result.dropped == {"max_pairs": 2, "min_margin": 2}
    assert result.candidates == len(list(itertools.combinations(range(4), 2)))


def test_same_text_is_never_a_pair_and_eval_gives_none():
    assert build_pairs(group_of([1.0, 0.0], texts=["x", "x"]), PairSettings()).dropped == {
        "same_text": 1
    }
    assert build_pairs(group_of([1.0, 0.0], split="eval"), PairSettings()).eval_group


def test_length_normalisation_changes_the_ranking():
    scored = group_of([2.0, 1.5], texts=["one two three four five six seven eight", "one two"])
    plain = build_pairs(scored, PairSettings()).pairs[0]
    per_token = build_pairs(scored, PairSettings(length_alpha=1.0)).pairs[0]
    assert (plain.chosen_index, per_token.chosen_index) == (0, 1)
    assert per_token.margin == 1.5 / 2 - 2.0 / 8


@settings(max_examples=300, deadline=None)
@given(
    score=st.floats(-1e6, 1e6, allow_nan=False),
    shorter=st.integers(0, 4000),
    extra=st.integers(0, 4000),
    alpha=st.floats(0, 2),
)
def test_length_never_helps_at_either_sign(score, shorter, extra, alpha):
    longer = shorter + extra
    short, long_ = (length_normalised(score, n, alpha) for n in (shorter, longer))
    assert long_ <= short  # same score, more tokens: never ranked higher
    assert (short >= 0) == (score >= 0)  # the sign is kept


@settings(max_examples=300, deadline=None)
@given(
    a=st.floats(-1e6, 1e6, allow_nan=False),
    b=st.floats(-1e6, 1e6, allow_nan=False),
    n=st.integers(0, 4000),
    alpha=st.floats(0, 2),
)
def test_length_normalisation_keeps_the_order_of_scores_at_one_length(a, b, n, alpha):
    if a <= b:
        assert length_normalised(a, n, alpha) <= length_normalised(b, n, alpha)
    assert length_normalised(a, n, 0.0) == a


def test_negative_scores_do_not_favour_long_answers():
    # A reward model's negative scores: the long answer scored lower. Dividing by the length
    # would rank it first (-3/16 = -0.19 > -2/2 = -1); here it stays last.
    scored = group_of([-2.0, -3.0], texts=["short answer", "a much longer answer " * 4])
    scored.group.completions[0].num_tokens = 2
    scored.group.completions[1].num_tokens = 16
    pair = build_pairs(scored, PairSettings(length_alpha=1.0)).pairs[0]
    assert pair.chosen_index == 0
    assert pair.margin == -2.0 * 2 - (-3.0 * 16)


def test_pair_metrics_count_kept_dropped_and_ties():
    metrics = JudgeMetrics()
    metrics.record_pairs(build_pairs(group_of([0.5, 0.5]), PairSettings()))
    metrics.record_pairs(build_pairs(group_of([1.0, 0.0]), PairSettings()))
    reg = metrics.metrics.registry
    assert reg.get_sample_value("onpolicy_judge_pairs_dropped_total", {"reason": "tie"}) == 1
    assert reg.get_sample_value("onpolicy_judge_pairs_produced_total") == 1
    assert reg.get_sample_value("onpolicy_judge_tie_rate") == 0.5
    assert reg.get_sample_value("onpolicy_judge_pair_margin_count") == 1
