"""The judge's Prometheus metrics (``onpolicy_judge_...``)."""

from __future__ import annotations

from onpolicy.telemetry import Metrics
from onpolicy_judge.pairs import PairResult

SCORE_BUCKETS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 2, 3, 4, 5, 10)
MARGIN_BUCKETS = (0.01, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1, 2, 3, 4, 5, 10)


class JudgeMetrics:
    """All judge metrics in one place; the backends and the pair rules report here."""

    def __init__(self, metrics: Metrics | None = None):
        self.metrics = metrics = metrics or Metrics("judge")
        self.groups = metrics.counter(
            "groups_scored_total", "Completion groups scored", ("backend", "split")
        )
        self.scores = metrics.histogram(
            "score", "Scores given to completions", ("backend",), buckets=SCORE_BUCKETS
        )
        self.latency = metrics.histogram("latency_seconds", "Time to score one group", ("backend",))
        self.parse_failures = metrics.counter(
            "parse_failures_total", "LLM-judge answers that could not be parsed", ("reason",)
        )
        self.api_errors = metrics.counter(
            "api_errors_total", "LLM-judge HTTP errors by status (or 'network')", ("status",)
        )
        self.truncated = metrics.counter(
            "truncated_total", "Reward-model inputs cut to max_length", ()
        )
        self.sequences = metrics.counter(
            "sequences_scored_total", "Completions scored", ("backend",)
        )
        self.batch_size = metrics.histogram(
            "batch_size",
            "Sequences per reward-model forward pass",
            (),
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
        )
        self.pairs = metrics.counter("pairs_produced_total", "Preference pairs kept", ())
        self.pairs_dropped = metrics.counter(
            "pairs_dropped_total", "Candidate pairs dropped, by rule", ("reason",)
        )
        self.margin = metrics.histogram(
            "pair_margin", "Margin of the kept pairs", (), buckets=MARGIN_BUCKETS
        )
        self.candidates = metrics.counter("pair_candidates_total", "Candidate pairs examined", ())
        self.ties = metrics.counter("pair_ties_total", "Candidate pairs with tied scores", ())
        self.tie_rate = metrics.gauge("tie_rate", "Tied candidates / candidates, since start", ())
        self._candidates = self._ties = 0

    def record_pairs(self, result: PairResult) -> None:
        for reason, n in result.dropped.items():
            self.pairs_dropped.labels(reason).inc(n)
        self.pairs.inc(len(result.pairs))
        for pair in result.pairs:
            self.margin.observe(pair.margin)
        self.candidates.inc(result.candidates)
        self.ties.inc(result.ties)
        self._candidates += result.candidates
        self._ties += result.ties
        if self._candidates:
            self.tie_rate.set(self._ties / self._candidates)
