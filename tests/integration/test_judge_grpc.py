"""gRPC ``onpolicy.v1.Judge/Score`` end to end: a real server on a free port, a real client."""

from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from onpolicy import messages as m
from onpolicy.v1 import judge_pb2, judge_pb2_grpc
from onpolicy_judge import JudgeSettings, build_judge
from onpolicy_judge.grpc_server import SERVICE_NAME, GrpcServer
from onpolicy_judge.runtime import JudgeRuntime
from onpolicy_judge.settings import GrpcSettings


@pytest.fixture
def channel():
    runtime = JudgeRuntime()
    judge = build_judge(JudgeSettings())
    server = GrpcServer(judge, GrpcSettings(host="127.0.0.1", port=0))
    port = runtime.run(server.start(), timeout=30)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            yield ch
    finally:
        runtime.run(server.stop(grace=1), timeout=30)
        runtime.stop()


def best_of_n_group(split: str = "train") -> m.CompletionGroup:
    answers = [
        ("Paris. Paris. Paris. Paris. Paris. Paris. Paris. Paris. Paris.", "length"),
        ("The capital of France is Paris.", "stop"),
        ("France's capital is Paris, a city on the Seine. " * 5, "stop"),
    ]
    return m.CompletionGroup(
        prompt_id="p-grpc",
        prompt=m.Prompt(id="p-grpc", text="What is the capital of France?", dataset_split=split),
        completions=[
            m.Completion(index=i, text=t, finish_reason=f) for i, (t, f) in enumerate(answers)
        ],
        policy_version=1,
    )


def test_score_returns_scores_and_pairs(channel):
    stub = judge_pb2_grpc.JudgeStub(channel)
    response = stub.Score(judge_pb2.ScoreRequest(group=best_of_n_group()), timeout=30)
    scores = list(response.scored.scores)
    assert len(scores) == 3
    assert max(range(3), key=scores.__getitem__) == 1  # best-of-n picks the concise answer
    assert response.scored.judge_id == "fn:concise"
    assert response.scored.id == m.record_id(response.scored)
    assert [(p.chosen_index, p.rejected_index) for p in response.pairs] == [
        (1, min(range(3), key=scores.__getitem__))
    ]
    eval_response = stub.Score(judge_pb2.ScoreRequest(group=best_of_n_group("eval")), timeout=30)
    assert list(eval_response.scored.scores) == scores and not eval_response.pairs


def test_invalid_group_is_invalid_argument(channel):
    stub = judge_pb2_grpc.JudgeStub(channel)
    with pytest.raises(grpc.RpcError) as info:
        stub.Score(judge_pb2.ScoreRequest(group=m.CompletionGroup(prompt_id="p")), timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "no completions" in info.value.details()


def test_health_service_reports_serving(channel):
    health = health_pb2_grpc.HealthStub(channel)
    for name in ("", SERVICE_NAME):
        reply = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
