"""The judge: a scoring backend plus the pair rules, usable from the service or a library.

``build_judge(settings)`` gives a :class:`Judge` whose ``score`` turns a CompletionGroup into
a ScoredGroup and whose ``pairs`` turns that into PreferencePairs. The service, the gRPC
``Score`` method and the on-policy loop all use the same object.
"""

from __future__ import annotations

import time

from onpolicy import ids
from onpolicy import messages as m
from onpolicy.serde import InvalidRecord
from onpolicy_judge.backend import Backend, BackendScores
from onpolicy_judge.functions import CombinedScorer
from onpolicy_judge.metrics import JudgeMetrics
from onpolicy_judge.pairs import PairResult, build_pairs
from onpolicy_judge.settings import JudgeSettings, PairSettings


class FunctionBackend:
    """Deterministic function scorers (see :mod:`onpolicy_judge.functions`)."""

    name = "function"

    def __init__(self, scorer: CombinedScorer):
        self.scorer = scorer
        self.judge_id = scorer.judge_id

    async def score(self, group: m.CompletionGroup) -> BackendScores:
        return BackendScores(self.scorer.score_group(group))

    async def aclose(self) -> None:
        return None


def check_group(group: m.CompletionGroup) -> None:
    """What every backend needs of a group; raises InvalidRecord (dead-lettered) otherwise."""
    m.validate(group)
    if not group.prompt.text.strip() and not group.prompt.messages:
        raise InvalidRecord("completion group carries no prompt (text or messages) to judge")
    m.validate(group.prompt)
    indices = [c.index for c in group.completions]
    if len(set(indices)) != len(indices):
        raise InvalidRecord(f"completion indices are not unique: {indices}")


class Judge:
    """Scores groups with one backend and builds pairs with the pair rules."""

    def __init__(
        self,
        backend: Backend,
        rules: PairSettings | None = None,
        metrics: JudgeMetrics | None = None,
        judge_id: str = "",
    ):
        self.backend = backend
        self.rules = rules or PairSettings()
        self.metrics = metrics or JudgeMetrics()
        self.judge_id = judge_id or backend.judge_id

    async def score(self, group: m.CompletionGroup) -> m.ScoredGroup:
        check_group(group)
        started = time.monotonic()
        result = await self.backend.score(group)
        latency = time.monotonic() - started
        if len(result.scores) != len(group.completions):  # a backend bug, never a silent drop
            raise RuntimeError(
                f"{self.backend.name} gave {len(result.scores)} scores "
                f"for {len(group.completions)} completions"
            )
        scored = m.ScoredGroup(
            id=ids.scored_id(group.id, self.judge_id),
            group=group,
            scores=result.scores,
            rationales=result.rationales,
            judge_id=self.judge_id,
            latency_s=latency,
        )
        backend = self.backend.name
        self.metrics.groups.labels(backend, group.prompt.dataset_split or "none").inc()
        self.metrics.latency.labels(backend).observe(latency)
        self.metrics.sequences.labels(backend).inc(len(result.scores))
        for s in result.scores:
            self.metrics.scores.labels(backend).observe(s)
        return scored

    def pair_result(self, scored: m.ScoredGroup) -> PairResult:
        result = build_pairs(scored, self.rules)
        self.metrics.record_pairs(result)
        return result

    def pairs(self, scored: m.ScoredGroup) -> list[m.PreferencePair]:
        """The pairs of ``scored`` under this judge's rules (none for the eval split)."""
        return self.pair_result(scored).pairs

    async def evaluate(
        self, group: m.CompletionGroup
    ) -> tuple[m.ScoredGroup, list[m.PreferencePair]]:
        """Score ``group`` and build its pairs in one call; the scored group lists them."""
        scored = await self.score(group)
        pairs = self.pairs(scored)
        scored.pair_ids[:] = [p.id for p in pairs]
        return scored, pairs

    async def aclose(self) -> None:
        await self.backend.aclose()


def build_backend(settings: JudgeSettings, metrics: JudgeMetrics) -> Backend:
    if settings.backend == "function":
        return FunctionBackend(CombinedScorer.from_specs(settings.functions))
    if settings.backend == "reward_model":
        from onpolicy_judge.reward_model import RewardModelBackend  # torch only when needed

        return RewardModelBackend(settings.reward_model, metrics)
    from onpolicy_judge.llm import LlmBackend

    return LlmBackend(settings.llm, metrics)


def build_judge(settings: JudgeSettings, metrics: JudgeMetrics | None = None) -> Judge:
    """The judge the settings describe (backend, pair rules, judge id)."""
    metrics = metrics or JudgeMetrics()
    return Judge(build_backend(settings, metrics), settings.pairs, metrics, settings.judge_id)
