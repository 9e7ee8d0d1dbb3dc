"""onpolicy judge: scores completion groups and builds preference pairs.

Library use::

    from onpolicy_judge import build_judge, JudgeSettings
    judge = build_judge(JudgeSettings())           # the default: the `concise` function judge
    scored = await judge.score(group)              # CompletionGroup -> ScoredGroup
    pairs = judge.pairs(scored)                    # -> list[PreferencePair]
"""

from onpolicy_judge import functions
from onpolicy_judge.backend import Backend, BackendScores
from onpolicy_judge.judge import FunctionBackend, Judge, build_judge
from onpolicy_judge.pairs import PairResult, build_pairs
from onpolicy_judge.settings import JudgeSettings, PairSettings

__all__ = [
    "Backend",
    "BackendScores",
    "FunctionBackend",
    "Judge",
    "JudgeSettings",
    "PairResult",
    "PairSettings",
    "build_judge",
    "build_pairs",
    "functions",
]
