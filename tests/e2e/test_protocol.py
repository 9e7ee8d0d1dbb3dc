"""The round protocol kept by the services themselves, started on their own as a deployment
starts them: two sampler replicas, two judge replicas, one trainer, a real broker, the real
vLLM server and real TRL. No ``onpolicy run``: prompts are published by a plain Kafka client
as JSON lines, many more than the rounds need, and one sampler replica is SIGKILLed mid-round
and restarted.
"""

from __future__ import annotations

import os
import time
import uuid
from importlib import resources

import httpx
import pytest
from kafka import KafkaProducer

from onpolicy import messages as m
from onpolicy.bus import ensure_topics, read_topic
from onpolicy.run.accounting import audit, trained_rows
from onpolicy.run.deployment import Deployment
from onpolicy.settings import TopicSettings

# Three real rounds (sampling, judging, DPO) of five services on two cores.
pytestmark = [pytest.mark.e2e, pytest.mark.vllm, pytest.mark.timeout(1800)]

ROUNDS = 3
ROUND_SIZE = 4
PUBLISHED = 40


def _publish_json_lines(kafka, topic: str, n: int) -> None:
    """The prompts as a person would publish them: JSON lines, no key, a plain client."""
    lines = (resources.files("onpolicy.data") / "demo_prompts.jsonl").read_text().splitlines()[:n]
    producer = KafkaProducer(bootstrap_servers=kafka.bootstrap_servers)
    for line in lines:
        producer.send(topic, line.encode())
    producer.flush(30)
    producer.close()


@pytest.fixture(scope="module")
def deployment(kafka, vllm, model_dir, tmp_path_factory):
    vllm.start()
    tmp = tmp_path_factory.mktemp("protocol")
    topics = TopicSettings(prefix=f"proto-{uuid.uuid4().hex[:6]}.", partitions=2)
    ensure_topics(kafka, topics)
    services = Deployment(
        # The services' own group timeouts: a DPO step on two shared cores can hold the
        # trainer's poll loop longer than the test fixture's short max_poll_interval.
        kafka=kafka.model_copy(
            update={"max_poll_interval_ms": 300_000, "session_timeout_ms": 10_000}
        ),
        topics=topics,
        folder=tmp,
        sampler={
            "vllm_url": vllm.url,
            "num_samples": 3,
            # Room for most answers to end (SmolLM2 averages ~58 tokens): at 48 most groups
            # had no finished answer, so no pair, and a round needed most of the prompts.
            "max_tokens": 96,
            "max_prompt_tokens": 64,  # the demo prompts have at most 60 tokens
            "concurrency": 8,
            # Unique per test: the session's vLLM serves other tests' adapters too.
            "adapter_prefix": f"{topics.prefix.strip('.')}-policy",
            "adapter_cache_dir": str(tmp / "adapters"),
            "adapter_uri_prefixes": [str(tmp / "checkpoints")],
        },
        judge={"backend": "function", "functions": [{"name": "concise"}]},
        trainer={
            "model": str(model_dir),
            "checkpoint_uri": str(tmp / "checkpoints"),
            "round_size": ROUND_SIZE,
            "round_timeout_s": 60.0,
            "max_length": 160,
            "learning_rate": 1e-3,
            "per_device_batch_size": 2,
        },
    )

    def versions() -> list[int]:
        policy = topics.name("policy")
        return [r.message.version for r in read_topic(kafka, policy, m.PolicyUpdate)]

    try:
        services.start()
        _publish_json_lines(kafka, topics.name("prompts"), PUBLISHED)
        # Round 2 is planned once v1 is out: kill one sampler while it samples round 2.
        services.wait(lambda: len(versions()) >= 1, 900, "policy v1")
        time.sleep(2)
        services.kill("sampler0")
        services.restart("sampler0")
        killed_at = len(versions())
        services.wait(lambda: len(versions()) >= ROUNDS, 1200, f"policy v{ROUNDS}")
        # What the trainer counted, before the services stop.
        counters = {
            reason: services["trainer"].metric(
                "onpolicy_trainer_pairs_dropped_total", reason=reason
            )
            for reason in ("stale", "duplicate", "too_long", "no_token_ids")
        }
        models = httpx.get(f"{vllm.url}/v1/models", timeout=10).json()["data"]
        yield {
            "topics": topics,
            "tmp": tmp,
            "dropped": counters,
            "killed_at": killed_at,
            "models": models,
        }
    finally:
        services.stop()
        print(services.log_tails())


def test_every_trained_pair_was_sampled_by_the_policy_its_round_improves(deployment, kafka):
    topics, tmp = deployment["topics"], deployment["tmp"]
    assert deployment["killed_at"] < ROUNDS  # the kill landed mid-run, before the last round
    plans = {}
    for r in read_topic(kafka, topics.name("rounds"), m.RoundPlan):
        plans[r.message.round] = r.message  # the newest seq of each round
    assert set(range(1, ROUNDS + 1)) <= set(plans)
    for round_ in range(1, ROUNDS + 1):
        assert plans[round_].sample_version == round_ - 1
    trained = trained_rows(tmp / "checkpoints")
    assert sorted(trained)[:ROUNDS] == list(range(1, ROUNDS + 1))
    for version in range(1, ROUNDS + 1):
        rows = trained[version]
        assert rows, f"round {version} trained nothing"
        assert {r["policy_version"] for r in rows} == {version - 1}
    all_ids = [r["pair_id"] for rows in trained.values() for r in rows]
    assert len(all_ids) == len(set(all_ids))  # no pair trained twice


def test_no_prompt_lost_and_almost_nothing_sampled_in_vain(deployment, kafka):
    topics, tmp = deployment["topics"], deployment["tmp"]
    letters = list(read_topic(kafka, topics.name("dlq"), m.DeadLetter))
    assert not letters, [d.message.error_message for d in letters]
    result = audit(kafka, topics, tmp / "checkpoints")
    assert result.published_prompts == PUBLISHED
    # Every prompt is trained, dropped with a recorded reason, or still waiting in Kafka.
    assert result.lost == [], result.as_dict()
    assert result.fates["trained"] >= ROUNDS * ROUND_SIZE
    assert result.fates["waiting"] > 0  # more were published than the rounds needed
    # Every group was sampled by (at least) the policy its round names.
    assert result.off_plan_groups == 0
    # Sampled in vain: groups of a superseded policy, dropped by the trainer as stale.
    stale = deployment["dropped"]["stale"]
    assert stale <= 0.05 * result.sampled_groups, (stale, result.sampled_groups)
    assert deployment["dropped"]["too_long"] == 0
    # The samplers took only what the rounds needed: far fewer than were published.
    assert result.sampled_groups < PUBLISHED


def test_each_round_was_sampled_from_its_own_adapter(deployment):
    served = {d["id"]: d["root"] for d in deployment["models"]}
    prefix = deployment["topics"].prefix.strip(".")
    ours = {name: root for name, root in served.items() if name.startswith(prefix)}
    assert ours, served
    for root in ours.values():
        assert str(deployment["tmp"]) in root or os.path.exists(root)
