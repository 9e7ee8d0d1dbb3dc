"""Preference pairs from a scored group, by the rules of :class:`PairSettings`.

Every candidate pair is either kept or dropped for exactly one reason, so the counters add up:
``same_text`` (identical answers), ``tie``, ``min_margin``, ``chosen_not_eos`` (a truncated
answer would be chosen) and ``max_pairs``. Groups of the held-out ``eval`` split give no pairs
at all; a group of one completion gives none (``single_completion``), and under the default
``finished="require"`` neither does a group where no sample ended (``none_finished``): a
cut-off answer trained as chosen teaches the policy to stop mid-sentence.

A pair carries the sampled token ids (prompt, chosen, rejected) and finish reasons, so the
trainer trains exactly what was drawn.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from onpolicy import ids
from onpolicy import messages as m
from onpolicy_judge.functions import approx_tokens
from onpolicy_judge.settings import PairSettings

EVAL_SPLIT = "eval"
DROP_REASONS = (
    "same_text",
    "tie",
    "min_margin",
    "chosen_not_eos",
    "max_pairs",
    "single_completion",
    "none_finished",
)


@dataclass
class PairResult:
    pairs: list[m.PreferencePair] = field(default_factory=list)
    dropped: Counter[str] = field(default_factory=Counter)
    candidates: int = 0
    ties: int = 0
    eval_group: bool = False


def length_normalised(score: float, tokens: int, alpha: float) -> float:
    """``score`` normalised for ``tokens`` so that, at any sign, a longer answer never ranks
    higher for the same score: dividing a negative score (reward models give them) by the
    length would move it towards zero, rewarding length. Monotone in the score, continuous
    at 0, the identity for ``alpha=0``."""
    factor = max(tokens, 1) ** alpha
    return score / factor if score >= 0 else score * factor


def ranking_scores(scored: m.ScoredGroup, rules: PairSettings) -> list[float]:
    """Scores used to rank and to compute margins: optionally length-normalised."""
    if rules.length_alpha == 0:
        return list(scored.scores)
    return [
        length_normalised(s, approx_tokens(c), rules.length_alpha)
        for s, c in zip(scored.scores, scored.group.completions, strict=True)
    ]


def _candidates(
    adj: list[float], eos: list[bool], rules: PairSettings, result: PairResult
) -> list[tuple[int, int]]:
    """Candidate (chosen, rejected) positions with adj[chosen] >= adj[rejected]."""
    n = len(adj)
    needs_eos = rules.finished == "require" or (rules.finished == "prefer" and any(eos))
    pool = [i for i in range(n) if eos[i]] if needs_eos else list(range(n))
    if rules.strategy == "all":
        out = []
        for a in range(n):
            for b in range(a + 1, n):
                # Higher score first; on a tie, the answer that ended properly.
                c, r = (a, b) if (adj[a], eos[a]) >= (adj[b], eos[b]) else (b, a)
                if needs_eos and not eos[c]:
                    result.dropped["chosen_not_eos"] += 1
                    continue
                out.append((c, r))
        return out
    best = max(pool, key=lambda i: (adj[i], -i))
    if rules.strategy == "best_worst":
        worst = min((i for i in range(n) if i != best), key=lambda i: (adj[i], -i))
        if adj[worst] > adj[best]:  # only truncated answers scored lower than the best EOS one
            result.dropped["chosen_not_eos"] += 1
            return []
        return [(best, worst)]
    out = []
    for j in range(n):
        if j == best:
            continue
        if adj[j] > adj[best]:  # only when best came from the EOS pool
            result.dropped["chosen_not_eos"] += 1
            continue
        out.append((best, j))
    return out


def build_pairs(scored: m.ScoredGroup, rules: PairSettings) -> PairResult:
    """The pairs of ``scored`` that pass ``rules``, and why the others were dropped."""
    group = scored.group
    result = PairResult()
    if group.prompt.dataset_split == EVAL_SPLIT:
        result.eval_group = True
        return result
    completions = list(group.completions)
    if len(completions) < 2:
        result.dropped["single_completion"] += 1
        return result
    eos = [c.finish_reason == "stop" for c in completions]
    if rules.finished == "require" and not any(eos):
        result.dropped["none_finished"] += 1
        return result
    adj = ranking_scores(scored, rules)
    candidates = _candidates(adj, eos, rules, result)
    # Largest margins first, so max_pairs_per_prompt keeps the clearest preferences.
    candidates.sort(key=lambda cr: adj[cr[1]] - adj[cr[0]])
    result.candidates = len(candidates) + result.dropped["chosen_not_eos"]
    for c, r in candidates:
        margin = adj[c] - adj[r]
        tie = margin <= rules.tie_epsilon
        result.ties += tie
        if completions[c].text == completions[r].text:
            result.dropped["same_text"] += 1
        elif tie and rules.drop_ties:
            result.dropped["tie"] += 1
        elif margin < rules.min_margin:
            result.dropped["min_margin"] += 1
        elif len(result.pairs) >= rules.max_pairs_per_prompt:
            result.dropped["max_pairs"] += 1
        else:
            result.pairs.append(make_pair(scored, c, r, margin))
    return result


def make_pair(scored: m.ScoredGroup, c: int, r: int, margin: float) -> m.PreferencePair:
    group = scored.group
    chosen, rejected = group.completions[c], group.completions[r]
    return m.PreferencePair(
        id=ids.pair_id(
            group.prompt_id, group.policy_version, chosen.index, rejected.index, scored.judge_id
        ),
        prompt_id=group.prompt_id,
        prompt=group.prompt,
        chosen=chosen.text,
        rejected=rejected.text,
        chosen_score=scored.scores[c],
        rejected_score=scored.scores[r],
        margin=margin,
        judge_id=scored.judge_id,
        policy_version=group.policy_version,
        group_id=group.id,
        scored_id=scored.id,
        chosen_index=chosen.index,
        rejected_index=rejected.index,
        prompt_token_ids=group.prompt_token_ids,
        chosen_token_ids=chosen.token_ids,
        rejected_token_ids=rejected.token_ids,
        chosen_finish_reason=chosen.finish_reason,
        rejected_finish_reason=rejected.finish_reason,
        sampling=group.sampling,
    )
