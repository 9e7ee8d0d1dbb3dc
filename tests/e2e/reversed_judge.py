"""A judge that is wrong on purpose for the regression-guard test (``reversed_judge:score``).

Round 0's training groups are scored upside down (``1 - concise``), so the policy they train
(v1) learns the opposite of what the held-out evaluation, scored with ``concise`` as judged,
rewards. Every other group is scored with ``concise`` itself.
"""

from __future__ import annotations

from onpolicy import messages as m
from onpolicy_judge.functions import concise


def score(completion: m.Completion, prompt: m.Prompt | None = None) -> float:
    value = concise(completion, prompt)
    if prompt is not None and prompt.dataset_split == "train" and prompt.round == 0:
        return 1.0 - value
    return value
