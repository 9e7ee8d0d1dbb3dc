"""A judge that is wrong on purpose for the regression-guard test (``reversed_judge:score``).

Every training group is scored upside down (``1 - concise``), so the policy trained on them
learns the opposite of what the held-out evaluation, scored with ``concise`` itself (held-out
groups are split ``eval``), rewards.
"""

from __future__ import annotations

from onpolicy import messages as m
from onpolicy_judge.functions import concise


def score(completion: m.Completion, prompt: m.Prompt | None = None) -> float:
    value = concise(completion, prompt)
    if prompt is not None and prompt.dataset_split != "eval":
        return 1.0 - value
    return value
