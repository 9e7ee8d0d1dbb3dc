"""The trainer's evaluator on a real broker: one EvalResult per version, verdicts, restarts."""

from __future__ import annotations

import pytest
from _util import scored

from onpolicy import messages as m
from onpolicy.bus import Producer, read_topic
from onpolicy.telemetry import Metrics
from onpolicy_trainer.evaluation import Evaluator
from onpolicy_trainer.settings import TrainerSettings

PROMPTS = ["p-a", "p-b", "p-c"]


@pytest.fixture
def settings(kafka, topics):
    return TrainerSettings(
        kafka=kafka,
        topics=topics,
        evaluation={"timeout_s": 2.0, "margin_se": 2.0},
    )


def test_one_result_per_version_a_regression_rejected_and_a_restart_repeats_nothing(
    settings, kafka, topics
):
    producer = Producer(kafka, client_id="test-eval")
    for pid in PROMPTS:
        producer.send_sync(topics.name("heldout"), m.Prompt(id=pid, text=f"question {pid}"))
    for pid, s in zip(PROMPTS, ([0.9, 0.8], [0.7, 0.9], [0.8, 0.8]), strict=True):
        producer.send_sync(topics.name("scored"), scored(topics, pid, 0, s))
    # A training group of the same version is not part of the evaluation.
    producer.send_sync(topics.name("scored"), scored(topics, "p-train", 0, [0.0], "prompts"))

    evaluator = Evaluator(settings, producer, Metrics("trainer"))
    evaluator.start()
    try:
        v0 = evaluator.wait_result(0, timeout_s=30)
        assert v0 is not None and v0.complete and v0.verdict == "promoted"
        assert (v0.prompts, v0.expected, v0.samples) == (3, 3, 6)
        assert v0.mean == pytest.approx((0.9 + 0.8 + 0.7 + 0.9 + 0.8 + 0.8) / 6)
        # v1 answers much worse: rejected against v0.
        for pid in PROMPTS:
            producer.send_sync(topics.name("scored"), scored(topics, pid, 1, [0.1, 0.2]))
        v1 = evaluator.wait_result(1, timeout_s=30)
        assert v1 is not None and v1.verdict == "rejected" and v1.best_version == 0
        # v2: only two of the three prompts ever scored: published partial after timeout_s.
        for pid in PROMPTS[:2]:
            producer.send_sync(topics.name("scored"), scored(topics, pid, 2, [0.85, 0.85]))
        v2 = evaluator.wait_result(2, timeout_s=30)
        assert v2 is not None and not v2.complete and (v2.prompts, v2.expected) == (2, 3)
        # v1 was rejected, so v2 is compared with v0, the best promoted version.
        assert v2.best_version == 0 and v2.verdict == "promoted"
    finally:
        evaluator.stop()

    published = [r.message for r in read_topic(kafka, topics.name("evals"), m.EvalResult)]
    assert [(e.id, e.verdict) for e in published] == [
        ("eval-v0", "promoted"),
        ("eval-v1", "rejected"),
        ("eval-v2", "promoted"),
    ]
    # A restarted evaluator recomputes its state from Kafka and publishes nothing again.
    again = Evaluator(settings, producer, Metrics("trainer"))
    again.start()
    try:
        assert again.wait_result(1, timeout_s=30).verdict == "rejected"
        assert again.best_promoted().version == 2  # 0.85 over v0's 0.817
    finally:
        again.stop()
    assert len(list(read_topic(kafka, topics.name("evals"), m.EvalResult))) == 3
    producer.close()


def test_no_heldout_prompts_means_no_wait(settings, kafka):
    evaluator = Evaluator(settings, Producer(kafka, client_id="test-eval-2"), Metrics("trainer"))
    evaluator.start()
    try:
        assert evaluator.wait_result(0, timeout_s=20) is None
    finally:
        evaluator.stop()
