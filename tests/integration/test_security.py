"""The secured local broker (``kafka_security=sasl_ssl``): TLS both ways, SCRAM-SHA-512 users
and the StandardAuthorizer's ACLs from ``onpolicy.stack.kafka_acls``, one broker for the module.

Each service's Kafka clients, logged in as its own principal, do their stage's work: the real
judge service, and the sampler's and trainer's processors (their groups, topics and handlers'
outputs; vLLM and training are not what is under test here) and topic readers. A publisher is
refused, with Kafka's authorization error, when it writes anything but prompts; a client with
no credentials, a wrong password or no client certificate cannot connect at all.
"""

from __future__ import annotations

import time

import httpx
import pytest
from _util import running, sample_value, wait_records, wait_until
from kafka import KafkaConsumer
from kafka.admin import KafkaAdminClient
from kafka.errors import (
    GroupAuthorizationFailedError,
    KafkaError,
    TopicAuthorizationFailedError,
)

from onpolicy import messages as m
from onpolicy.bus import Output, Processor, ProcessorConfig, Producer, ensure_topics, read_topic
from onpolicy.run.procs import free_port
from onpolicy.settings import HttpSettings, KafkaSettings, TopicSettings
from onpolicy.stack import KafkaBroker, StackSettings
from onpolicy.telemetry import Metrics, ServiceServer
from onpolicy_judge.service import build as build_judge
from onpolicy_judge.settings import JudgeSettings
from onpolicy_sampler.vllm_client import VllmClient

CONCISE = "Paris."
RAMBLE = "The capital of France is a city, and that city is Paris, a city. " * 6
# Short group timeouts keep the groups' joins quick, as the shared fixture's do.
FAST = {"session_timeout_ms": 6000, "heartbeat_interval_ms": 500, "max_poll_interval_ms": 20_000}


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory):
    settings = StackSettings(
        state_dir=tmp_path_factory.mktemp("secure-stack"),
        kafka_port=free_port(),
        kafka_controller_port=free_port(),
        kafka_security="sasl_ssl",
        topics=TopicSettings(prefix="sec.", partitions=2, create=False),
        kafka=KafkaSettings(linger_ms=0, **FAST),
    )
    broker = KafkaBroker(settings)
    broker.start(timeout=120)
    try:
        # Only the admin (the stack) may create topics; the services run with create=false.
        ensure_topics(broker.client(), settings.topics)
        yield broker
    finally:
        broker.stop()


@pytest.fixture(scope="module")
def topics(broker: KafkaBroker) -> TopicSettings:
    return broker.settings.topics


def prompt(pid: str) -> m.Prompt:
    return m.Prompt(id=pid, text="What is the capital of France?", dataset_split="train")


def completions(p: m.Prompt) -> m.CompletionGroup:
    return m.CompletionGroup(
        prompt_id=p.id,
        prompt=p,
        completions=[
            m.Completion(index=0, text=RAMBLE, finish_reason="length", num_tokens=128),
            m.Completion(index=1, text=CONCISE, finish_reason="stop", num_tokens=3),
        ],
        policy_version=0,
    )


def committed(broker: KafkaBroker, group: str, topic: str) -> int:
    admin = KafkaAdminClient(**broker.client().client_config())
    try:
        offsets = admin.list_group_offsets(group).get(group, {})
    finally:
        admin.close()
    return sum(meta.offset for tp, meta in offsets.items() if tp.topic == topic)


def test_files_holding_secrets_are_the_owners_alone(broker: KafkaBroker) -> None:
    for path in (broker.state / "server.properties", *broker.security.dir.iterdir()):
        if path.name not in ("ca.pem", "client.pem", "broker.pem", "ca.srl"):
            assert path.stat().st_mode & 0o077 == 0, path
    assert broker.security.password("sampler") not in broker.process.log_tail(500)


def test_each_service_does_its_stage_under_its_own_principal(broker, topics) -> None:
    as_ = broker.client
    publisher = Producer(as_("publisher"))
    prompts = [prompt(f"p-{i}") for i in range(3)]
    for p in prompts:
        publisher.send_sync(topics.name("prompts"), p)
    publisher.close()

    # The sampler's processor: prompts (group sampler) in, completions out.
    sampler = Processor(
        kafka=as_("sampler"),
        source=topics.name("prompts"),
        message_type=m.Prompt,
        handler=lambda r: [Output(topics.name("completions"), completions(r.message))],
        config=ProcessorConfig(group_id="sampler"),
        metrics=Metrics("sampler"),
        dead_letter_topic=topics.name("dlq"),
    )
    # The real judge service, function backend.
    judge_settings = JudgeSettings(
        kafka=as_("judge"), topics=topics, group_id="judge", grpc={"enabled": False}
    )
    judge_metrics = Metrics("judge")
    judge = build_judge(
        judge_settings, judge_metrics, ServiceServer("judge", judge_metrics, HttpSettings(port=0))
    )
    # The trainer's processor: pairs (group trainer) in.
    seen: list[m.PreferencePair] = []
    trainer = Processor(
        kafka=as_("trainer"),
        source=topics.name("pairs"),
        message_type=m.PreferencePair,
        handler=lambda r: seen.append(r.message) or [],
        config=ProcessorConfig(group_id="trainer"),
        metrics=Metrics("trainer"),
        dead_letter_topic=topics.name("dlq"),
    )
    with running(sampler), running(judge), running(trainer):
        wait_until(lambda: len(seen) == 3, timeout=60, what="3 pairs at the trainer")
        for group, topic in (("sampler", "prompts"), ("judge", "completions")):
            wait_until(
                lambda g=group, t=topic: committed(broker, g, topics.name(t)) == 3,
                what=f"{group} committed",
            )
        wait_until(lambda: committed(broker, "trainer", topics.name("pairs")) == 3, what="commit")
    assert sorted(p.prompt_id for p in seen) == ["p-0", "p-1", "p-2"]
    assert all(p.chosen == CONCISE for p in seen)

    # The trainer publishes a policy and a round plan; the sampler follows both.
    producer = Producer(as_("trainer"))
    producer.send_sync(
        topics.name("policy"),
        m.PolicyUpdate(id="policy-v1", version=1, adapter_uri="/ckpt/v1", base_model="b"),
    )
    producer.send_sync(topics.name("rounds"), m.RoundPlan(id="round-2-0", round=2))
    producer.close()
    follower = as_("sampler")
    policy = read_topic(follower, topics.name("policy"), m.PolicyUpdate)
    assert [r.message.version for r in policy] == [1]
    assert [r.message.round for r in read_topic(follower, topics.name("rounds"), m.RoundPlan)] == [
        2
    ]
    # The trainer's planner reads the prompts and the scored groups.
    planner = as_("trainer")
    assert len(list(read_topic(planner, topics.name("prompts"), m.Prompt))) >= 3
    assert len(list(read_topic(planner, topics.name("scored"), m.ScoredGroup))) == 3
    assert list(read_topic(broker.client(), topics.name("dlq"), m.DeadLetter)) == []


def test_each_principal_sees_exactly_the_topics_its_acls_grant(broker, topics) -> None:
    from onpolicy.stack.kafka_acls import ACCESS

    for principal, access in ACCESS.items():
        consumer = KafkaConsumer(**broker.client(principal).client_config(), group_id=None)
        try:
            visible = {t for t in consumer.topics() if t.startswith(topics.prefix)}
        finally:
            consumer.close()
        expected = {topics.name(k) for k in (*access["read"], *access["write"])}
        assert visible == expected, principal


def refused_write(kafka: KafkaSettings, topic: str, message) -> Exception:
    producer = Producer(kafka.model_copy(update={"request_timeout_ms": 10_000}))
    try:
        with pytest.raises(KafkaError) as info:
            producer.send_sync(topic, message, timeout=30)
        return info.value
    finally:
        producer.close(timeout=5)


def test_a_publisher_may_write_prompts_only(broker, topics) -> None:
    publisher = broker.client("publisher")
    policy = m.PolicyUpdate(id="policy-v9", version=9, adapter_uri="s3://evil/adapter")
    error = refused_write(publisher, topics.name("policy"), policy)
    assert isinstance(error, TopicAuthorizationFailedError), repr(error)
    assert topics.name("policy") in str(error)
    pair = m.PreferencePair(id="pair-x", prompt_id="p-x", chosen="a", rejected="b")
    error = refused_write(publisher, topics.name("pairs"), pair)
    assert isinstance(error, TopicAuthorizationFailedError), repr(error)
    # Nor may it read what the loop produces: the policy topic does not exist for it.
    for principal, visible in (("publisher", False), ("sampler", True)):
        consumer = KafkaConsumer(**broker.client(principal).client_config(), group_id=None)
        try:
            # kafka-python: an empty set for a topic the principal may not describe
            assert bool(consumer.partitions_for_topic(topics.name("policy"))) == visible
        finally:
            consumer.close()
    admin = broker.client()
    assert all(
        r.message.version != 9 for r in read_topic(admin, topics.name("policy"), m.PolicyUpdate)
    )
    pairs = read_topic(admin, topics.name("pairs"), m.PreferencePair)
    assert all(r.message.id != "pair-x" for r in pairs)


def test_a_service_stays_in_its_lane(broker, topics) -> None:
    # The judge may not publish a policy, the sampler may not join the trainer's group.
    policy = m.PolicyUpdate(id="policy-v7", version=7, adapter_uri="/ckpt/v7")
    error = refused_write(broker.client("judge"), topics.name("policy"), policy)
    assert isinstance(error, TopicAuthorizationFailedError), repr(error)
    consumer = KafkaConsumer(
        topics.name("prompts"), **broker.client("sampler").client_config(), group_id="trainer"
    )
    try:
        with pytest.raises(GroupAuthorizationFailedError):
            for _ in range(5):
                consumer.poll(timeout_ms=2000)
    finally:
        consumer.close()


def test_an_output_topic_outside_the_acls_pauses_instead_of_dead_lettering(broker, topics):
    """A judge whose outputs its ACLs refuse (a wrong topic setting, a missing ACL): Kafka's
    authorization error pauses it like a configuration error; no good record is dead-lettered
    or committed."""
    source = topics.name("completions")
    admin = broker.client()
    before = committed(broker, "judge", source)
    producer = Producer(broker.client("sampler"))
    producer.send_sync(source, completions(prompt("acl-0")))
    producer.close()
    dead_before = len(list(read_topic(admin, topics.name("dlq"), m.DeadLetter)))
    update = m.PolicyUpdate(id="policy-v5", version=5, adapter_uri="/ckpt/v5")
    metrics = Metrics("judge")
    processor = Processor(
        kafka=broker.client("judge"),
        source=source,
        message_type=m.CompletionGroup,
        handler=lambda r: [Output(topics.name("policy"), update)],
        config=ProcessorConfig(
            group_id="judge", breaker_reset_s=0.5, breaker_max_reset_s=1.0, drain_timeout_s=2.0
        ),
        metrics=metrics,
        dead_letter_topic=topics.name("dlq"),
    )
    with running(processor):
        wait_until(
            lambda: sample_value(metrics, "paused", topic=source, reason="config") == 1,
            what="paused for an authorization error",
        )
        time.sleep(2.0)  # probes fail alike: nothing dead-lettered, nothing committed
        assert committed(broker, "judge", source) == before
    assert len(list(read_topic(admin, topics.name("dlq"), m.DeadLetter))) == dead_before
    assert all(
        r.message.version != 5 for r in read_topic(admin, topics.name("policy"), m.PolicyUpdate)
    )


def test_a_client_without_credentials_cannot_connect(broker) -> None:
    good = broker.client("publisher").model_copy(update={"request_timeout_ms": 5000})
    cases = {
        "no TLS, no login": KafkaSettings(
            bootstrap_servers=broker.bootstrap, request_timeout_ms=5000
        ),
        "TLS, no login": good.model_copy(
            update={"security_protocol": "SSL", "sasl_mechanism": None}
        ),
        "a wrong password": good.model_copy(
            update={"sasl_password": good.sasl_password.__class__("not-the-password")}
        ),
        "no client certificate": good.model_copy(
            update={"ssl_certfile": None, "ssl_keyfile": None}
        ),
    }

    def list_topics(kafka: KafkaSettings) -> list[str]:
        # A refused client retries its bootstrap until this runs out (30 s by default).
        admin = KafkaAdminClient(**kafka.client_config(), bootstrap_timeout_ms=5000)
        try:
            return admin.list_topics()
        finally:
            admin.close()

    assert broker.settings.topics.name("prompts") in list_topics(good)  # the cases' baseline
    for case, kafka in cases.items():
        try:
            list_topics(kafka)
        except KafkaError:
            pass  # no connection, or the login refused
        else:
            pytest.fail(f"{case}: connected and listed the topics")


def test_vllm_refusing_the_samplers_key_pauses_it_without_dead_letters(broker, topics) -> None:
    """A vLLM started with --api-key and a sampler holding another key (vLLM's 401 body, at
    httpx's transport): the sampler's processor pauses, is not ready, dead-letters nothing and
    commits nothing, then resumes once the key is right."""
    key = {"sent": "wrong"}

    def vllm(request: httpx.Request) -> httpx.Response:
        if request.headers.get("authorization") != "Bearer right":
            return httpx.Response(401, json={"error": "Unauthorized"})
        choice = {"index": 0, "message": {"content": CONCISE}, "finish_reason": "stop"}
        return httpx.Response(200, json={"choices": [choice], "usage": {}})

    async def handle(record):
        client = VllmClient(
            "http://vllm", key["sent"], transport=httpx.MockTransport(vllm), timeout_s=5
        )
        try:
            await client.sample(
                model="m", params={}, n=1, messages=[{"role": "user", "content": "?"}]
            )
        finally:
            await client.aclose()
        return [Output(topics.name("completions"), completions(record.message))]

    admin = broker.client()
    source = topics.name("prompts")
    before = committed(broker, "sampler", source)  # the first test's prompts, if it ran
    publisher = Producer(broker.client("publisher"))
    for p in (prompt("k-0"), prompt("k-1")):
        publisher.send_sync(source, p)
    publisher.close()
    metrics = Metrics("sampler")
    processor = Processor(
        kafka=broker.client("sampler"),
        source=source,
        message_type=m.Prompt,
        handler=handle,
        config=ProcessorConfig(group_id="sampler", breaker_reset_s=0.5, breaker_max_reset_s=1.0),
        metrics=metrics,
        dead_letter_topic=topics.name("dlq"),
    )
    dead_before = len(list(read_topic(admin, topics.name("dlq"), m.DeadLetter)))
    with running(processor):
        wait_until(
            lambda: sample_value(metrics, "paused", topic=source, reason="config") == 1,
            what="paused for a configuration error",
        )
        assert processor.paused_reason == "config" and not processor.backend_ok
        time.sleep(2.0)  # probes come and fail: still nothing dead-lettered or committed
        assert len(list(read_topic(admin, topics.name("dlq"), m.DeadLetter))) == dead_before
        assert committed(broker, "sampler", source) == before
        key["sent"] = "right"
        wait_until(
            lambda: committed(broker, "sampler", source) == before + 2,
            what="resumed and committed",
        )
        assert sample_value(metrics, "paused", topic=source, reason="config") == 0
    assert len(list(read_topic(admin, topics.name("dlq"), m.DeadLetter))) == dead_before
    produced = wait_records(admin, topics.name("completions"), m.CompletionGroup, 2)
    assert {"k-0", "k-1"} <= {r.message.prompt_id for r in produced}
