"""A judge that is wrong on purpose for the regression-guard test (``reversed_judge:score``).

Training groups are scored to prefer answers that run into the token limit (1 when cut off,
0 when ended), so the policy trained on them learns to never end its answers: exactly what
the held-out evaluation, scored with ``concise`` itself (held-out groups are split ``eval``),
punishes (a cut-off answer scores half, and long ones less).
"""

from __future__ import annotations

from onpolicy import messages as m
from onpolicy_judge.functions import concise


def score(completion: m.Completion, prompt: m.Prompt | None = None) -> float:
    if prompt is not None and prompt.dataset_split != "eval":
        return 1.0 if completion.finish_reason == "length" else 0.0
    return concise(completion, prompt)
