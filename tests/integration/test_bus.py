"""The Kafka bus against a real Apache Kafka broker."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from _util import committed, running, sample_value, wait_records, wait_until
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer
from kafka.errors import KafkaError
from kafka.structs import OffsetAndMetadata, TopicPartition

from onpolicy import messages as m
from onpolicy.bus import (
    Output,
    Processor,
    ProcessorConfig,
    Producer,
    RecordTooLarge,
    TransientError,
    read_topic,
)
from onpolicy.serde import encode
from onpolicy.telemetry import Metrics

HERE = Path(__file__).parent


def echo_group(prompt: m.Prompt) -> m.CompletionGroup:
    return m.CompletionGroup(
        prompt_id=prompt.id,
        prompt=prompt,
        completions=[m.Completion(index=0, text=f"echo: {prompt.text}", finish_reason="stop")],
    )


def make_processor(kafka, topics, handler, group="g", metrics=None, **config) -> Processor:
    return Processor(
        kafka=kafka,
        source=topics.name("prompts"),
        message_type=m.Prompt,
        handler=handler,
        config=ProcessorConfig(group_id=f"{topics.prefix}{group}", **config),
        metrics=metrics or Metrics("test"),
        dead_letter_topic=topics.name("dlq"),
    )


TYPED_TOPICS = [
    ("prompts", m.Prompt(text="Name three colours.", metadata={"k": "v"})),
    (
        "completions",
        m.CompletionGroup(prompt_id="p", completions=[m.Completion(text="x")], policy_version=2),
    ),
    (
        "scored",
        m.ScoredGroup(
            group=m.CompletionGroup(prompt_id="p", completions=[m.Completion(text="x")]),
            scores=[0.5],
            judge_id="j",
        ),
    ),
    ("pairs", m.PreferencePair(prompt_id="p", chosen="a", rejected="b", margin=1.0)),
    ("policy", m.PolicyUpdate(version=1, adapter_uri="/tmp/adapter", base_model="b")),
    (
        "dlq",
        m.DeadLetter(source_topic="x", offset=3, error_kind="decode", original_value=b"\x00\x01"),
    ),
]


def test_every_message_type_round_trips_binary_and_json(kafka, topics):
    producer = Producer(kafka)
    for kind, message in TYPED_TOPICS:
        m.validate(message)
        producer.send_sync(topics.name(kind), message, fmt="protobuf")
        producer.send_sync(topics.name(kind), message, fmt="json")
    producer.close()
    for kind, message in TYPED_TOPICS:
        records = wait_records(kafka, topics.name(kind), type(message), 2)
        assert [r.message for r in records] == [message, message]
        # The Kafka key is the record's deterministic id.
        assert {r.key for r in records} == {message.id.encode()}
        types = {dict(r.headers)["content-type"] for r in records}
        assert types == {b"application/x-protobuf", b"application/json"}


def test_a_person_can_publish_a_plain_json_line(kafka, topics):
    raw = KafkaProducer(bootstrap_servers=kafka.bootstrap_servers)
    raw.send(topics.name("prompts"), json.dumps({"text": "Hello there"}).encode()).get(30)
    raw.close()
    with running(
        make_processor(
            kafka, topics, lambda r: [Output(topics.name("completions"), echo_group(r.message))]
        )
    ):
        [out] = wait_records(kafka, topics.name("completions"), m.CompletionGroup, 1)
    assert out.message.completions[0].text == "echo: Hello there"
    assert out.message.prompt_id.startswith("p-")


def test_undecodable_and_invalid_records_go_to_the_dead_letter_topic(kafka, topics):
    raw = KafkaProducer(bootstrap_servers=kafka.bootstrap_servers)
    source = topics.name("prompts")
    bad = [
        (b"\x00garbage\xff", []),  # not decodable
        (b'{"text": "x", "bogusField": 1}', [("content-type", b"application/json")]),
        (b'{"text": ""}', []),  # decodes, invalid
    ]
    for value, headers in bad:
        raw.send(source, value, headers=headers, partition=0).get(30)
    good, headers = encode(m.Prompt(text="still here"))
    raw.send(source, good, headers=headers, partition=0).get(30)
    raw.close()

    seen = []
    processor = make_processor(
        kafka,
        topics,
        lambda r: (
            seen.append(r.message.text)
            or [Output(topics.name("completions"), echo_group(r.message))]
        ),
    )
    with running(processor):
        letters = wait_records(kafka, topics.name("dlq"), m.DeadLetter, 3)
        wait_records(kafka, topics.name("completions"), m.CompletionGroup, 1)
        wait_until(
            lambda: committed(kafka, processor.config.group_id, source).get(0) == 4,
            what="commit after the good record",
        )
    assert seen == ["still here"]
    by_offset = {d.message.offset: d.message for d in letters}
    assert by_offset[0].error_kind == "decode" and "not a JSON object" in by_offset[0].error_message
    assert by_offset[0].original_value == b"\x00garbage\xff"
    assert by_offset[1].error_kind == "decode" and "bogusField" in by_offset[1].error_message
    assert by_offset[2].error_kind == "invalid" and "empty" in by_offset[2].error_message
    assert all(d.source_topic == source and d.consumer_group for d in by_offset.values())


def test_failing_handler_is_retried_then_dead_lettered(kafka, topics):
    calls = []

    def handler(record):
        calls.append(record.attempt)
        raise ValueError("judge exploded")

    processor = make_processor(kafka, topics, handler, max_attempts=3, retry_backoff_s=0.05)
    Producer(kafka).send_sync(topics.name("prompts"), m.Prompt(text="boom"))
    with running(processor):
        [letter] = wait_records(kafka, topics.name("dlq"), m.DeadLetter, 1)
    assert calls == [1, 2, 3]
    assert letter.message.error_kind == "processing" and letter.message.attempts == 3
    assert "judge exploded" in letter.message.error_message


def test_transient_errors_retry_until_the_backend_recovers(kafka, topics):
    attempts = []

    async def handler(record):
        attempts.append(record.attempt)
        if len(attempts) <= 4:  # more than max_attempts: transient errors are never dropped
            raise TransientError("vLLM unreachable")
        return [Output(topics.name("completions"), echo_group(record.message))]

    processor = make_processor(kafka, topics, handler, max_attempts=2, retry_backoff_s=0.05)
    Producer(kafka).send_sync(topics.name("prompts"), m.Prompt(text="patience"))
    with running(processor):
        wait_records(kafka, topics.name("completions"), m.CompletionGroup, 1)
    assert attempts == [1, 2, 3, 4, 5]
    assert list(read_topic(kafka, topics.name("dlq"), m.DeadLetter)) == []


def test_oversized_record_is_a_clear_error_never_a_silent_drop(kafka, topics):
    small = kafka.model_copy(update={"max_request_size": 2048})
    producer = Producer(small)
    with pytest.raises(RecordTooLarge, match=r"max_request_size=2048"):
        producer.send_sync(topics.name("prompts"), m.Prompt(text="x" * 5000))

    # Inside a processor the input that produced it is dead-lettered with that reason.
    processor = Processor(
        kafka=small,
        source=topics.name("prompts"),
        message_type=m.Prompt,
        handler=lambda r: [
            Output(
                topics.name("completions"),
                m.CompletionGroup(
                    prompt_id=r.message.id, completions=[m.Completion(text="y" * 5000)]
                ),
            )
        ],
        config=ProcessorConfig(group_id=f"{topics.prefix}big"),
        metrics=Metrics("test"),
        dead_letter_topic=topics.name("dlq"),
    )
    Producer(kafka).send_sync(topics.name("prompts"), m.Prompt(text="make it big"))
    with running(processor):
        [letter] = wait_records(kafka, topics.name("dlq"), m.DeadLetter, 1)
    assert letter.message.error_kind == "too_large"
    assert "over the size limits" in letter.message.error_message


def test_slow_handler_beyond_max_poll_interval_causes_no_rebalance(kafka, topics):
    quick = kafka.model_copy(update={"max_poll_interval_ms": 4000, "session_timeout_ms": 3000})
    calls = []

    def slow(record):
        calls.append(record.message.text)
        time.sleep(9)  # over twice max.poll.interval.ms
        return [Output(topics.name("completions"), echo_group(record.message))]

    processor = make_processor(quick, topics, slow)
    Producer(kafka).send_sync(topics.name("prompts"), m.Prompt(text="slowly"))
    with running(processor):
        wait_records(kafka, topics.name("completions"), m.CompletionGroup, 1, timeout=60)
        wait_until(
            lambda: (
                sum(committed(kafka, processor.config.group_id, topics.name("prompts")).values())
                == 1
            ),
            what="commit",
        )
        time.sleep(2)  # a duplicate would show up here if the group had rebalanced
        assert processor.revocations == 0
    assert calls == ["slowly"]
    assert len(list(read_topic(kafka, topics.name("completions"), m.CompletionGroup))) == 1


def test_member_joining_mid_work_lets_in_flight_records_finish_and_commit(kafka, topics):
    """A rebalance waits for in-flight records (heartbeating meanwhile), commits, hands over."""
    quick = kafka.model_copy(update={"session_timeout_ms": 3000, "heartbeat_interval_ms": 300})

    async def slow(record):
        import asyncio

        await asyncio.sleep(4)  # longer than the session timeout
        return [Output(topics.name("completions"), echo_group(record.message))]

    first = make_processor(quick, topics, slow, concurrency=8)
    second = make_processor(quick, topics, slow, concurrency=8)
    raw = KafkaProducer(bootstrap_servers=kafka.bootstrap_servers)
    for i in range(8):
        value, headers = encode(m.validate(m.Prompt(text=f"p{i}")))
        raw.send(topics.name("prompts"), value, headers=headers, partition=i % 2).get(30)
    raw.close()
    with running(first):
        wait_until(lambda: first._offsets.in_flight() == 8, what="all records in flight")
        with running(second):
            wait_until(lambda: first.revocations >= 1, what="a rebalance")
            wait_until(
                lambda: (
                    sum(committed(kafka, first.config.group_id, topics.name("prompts")).values())
                    == 8
                ),
                timeout=60,
                what="commits",
            )
    outputs = list(read_topic(kafka, topics.name("completions"), m.CompletionGroup))
    # Had the first member been evicted mid-drain, the second would have redone its records.
    assert sorted(r.message.prompt.text for r in outputs) == [f"p{i}" for i in range(8)]


def test_partitions_kept_through_a_rebalance_commit_nothing_past_unfinished_records(kafka, topics):
    """A rebalance that outlasts the drain and gives this member its partition back: the
    records still being handled are not fetched again (the position is kept), are handled
    once, and no commit passes them meanwhile."""
    release = threading.Event()
    calls = []

    async def held(record):
        import asyncio

        calls.append(record.message.text)
        while record.message.text != "late" and not release.is_set():
            await asyncio.sleep(0.05)
        return [Output(topics.name("completions"), echo_group(record.message))]

    processor = make_processor(kafka, topics, held, concurrency=8, drain_timeout_s=0.5)
    raw = KafkaProducer(bootstrap_servers=kafka.bootstrap_servers)

    def send(text: str) -> None:
        value, headers = encode(m.validate(m.Prompt(text=text)))
        raw.send(topics.name("prompts"), value, headers=headers, partition=0).get(30)

    for i in range(4):
        send(f"p{i}")
    with running(processor):
        wait_until(lambda: processor._offsets.in_flight() == 4, what="all records in flight")
        # A member of the same group on another topic: the group rebalances and this member,
        # the only one on the prompts, gets its partitions back.
        other = KafkaConsumer(
            topics.name("completions"), **kafka.client_config(), group_id=processor.config.group_id
        )
        try:
            wait_until(
                lambda: other.poll(timeout_ms=100) is not None and other.assignment(),
                what="the rebalance",
            )
        finally:
            other.close()
        assert processor.revocations >= 1
        send("late")
        wait_records(kafka, topics.name("completions"), m.CompletionGroup, 1)
        time.sleep(1)  # commits go out every 0.2 s
        assert committed(kafka, processor.config.group_id, topics.name("prompts")).get(0, 0) == 0
        release.set()
        wait_until(
            lambda: committed(kafka, processor.config.group_id, topics.name("prompts")).get(0) == 5,
            what="commit",
        )
    raw.close()
    assert sorted(calls) == ["late", "p0", "p1", "p2", "p3"]
    outputs = list(read_topic(kafka, topics.name("completions"), m.CompletionGroup))
    assert sorted(r.message.prompt.text for r in outputs) == ["late", "p0", "p1", "p2", "p3"]


def test_evicted_member_handles_a_record_fetched_again_mid_handling_once(kafka, topics, tmp_path):
    """A member stalled past the session timeout (GC pause, starved CPU) is evicted; it rejoins,
    gets its partition back and re-reads it from the last commit while the first delivery is
    still being handled. That record must be produced once, not twice."""
    env = {**os.environ, "BOOTSTRAP": kafka.bootstrap_servers, "PREFIX": topics.prefix}
    started = tmp_path / "started"
    Producer(kafka).send_sync(topics.name("prompts"), m.Prompt(text="stalled"))
    worker = subprocess.Popen(
        [
            sys.executable,
            str(HERE / "_echo_worker.py"),
            "--slow",
            "20",
            "--mark",
            str(started),
            "--exit-when-idle",
        ],
        env=env,
    )
    try:
        wait_until(started.exists, timeout=120, what="the record to be in flight")
        worker.send_signal(signal.SIGSTOP)
        time.sleep(9)  # past the worker's 6 s session timeout: the broker evicts it
        worker.send_signal(signal.SIGCONT)
        assert worker.wait(timeout=120) == 0
    finally:
        worker.kill()
    assert started.read_text().splitlines() == ["stalled"]  # the handler ran once
    outputs = list(read_topic(kafka, topics.name("completions"), m.CompletionGroup))
    assert [o.message.prompt.text for o in outputs] == ["stalled"]
    assert sum(committed(kafka, f"{topics.prefix}echo", topics.name("prompts")).values()) == 1


def test_concurrent_handlers_commit_only_finished_prefix(kafka, topics):
    release = threading.Event()

    async def handler(record):
        import asyncio

        if record.message.text == "first":  # the first record is held back
            while not release.is_set():
                await asyncio.sleep(0.05)
        return [Output(topics.name("completions"), echo_group(record.message))]

    processor = make_processor(kafka, topics, handler, concurrency=4)
    raw = KafkaProducer(bootstrap_servers=kafka.bootstrap_servers)
    for text in ["first", "second", "third"]:
        value, headers = encode(m.validate(m.Prompt(text=text)))
        raw.send(topics.name("prompts"), value, headers=headers, partition=0).get(30)
    raw.close()
    with running(processor):
        wait_records(kafka, topics.name("completions"), m.CompletionGroup, 2)
        time.sleep(1)
        # Later records are done, but the commit may not pass the unfinished first one.
        assert committed(kafka, processor.config.group_id, topics.name("prompts")).get(0, 0) <= 0
        release.set()
        wait_until(
            lambda: committed(kafka, processor.config.group_id, topics.name("prompts")).get(0) == 3,
            what="commit",
        )


def test_consumer_killed_between_produce_and_commit(kafka, topics, tmp_path):
    """At-least-once: the record comes again; downstream drops the duplicate by its key."""
    env = {**os.environ, "BOOTSTRAP": kafka.bootstrap_servers, "PREFIX": topics.prefix}
    worker = [sys.executable, str(HERE / "_echo_worker.py")]
    Producer(kafka).send_sync(topics.name("prompts"), m.Prompt(text="once"))

    crashed = subprocess.run([*worker, "--crash-after-produce"], env=env, timeout=120)
    assert crashed.returncode == -signal.SIGKILL
    assert len(wait_records(kafka, topics.name("completions"), m.CompletionGroup, 1)) == 1
    assert sum(committed(kafka, f"{topics.prefix}echo", topics.name("prompts")).values()) == 0

    survivor = subprocess.Popen([*worker, "--exit-when-idle"], env=env)
    assert survivor.wait(timeout=120) == 0
    outputs = wait_records(kafka, topics.name("completions"), m.CompletionGroup, 2)
    assert len({o.key for o in outputs}) == 1  # the same deterministic key twice

    seen = []
    metrics = Metrics("downstream")
    downstream = Processor(
        kafka=kafka,
        source=topics.name("completions"),
        message_type=m.CompletionGroup,
        handler=lambda r: seen.append(r.message.id) or [],
        metrics=metrics,
        config=ProcessorConfig(group_id=f"{topics.prefix}down"),
        dead_letter_topic=topics.name("dlq"),
    )
    with running(downstream):
        wait_until(
            lambda: (
                sample_value(metrics, "duplicates_dropped_total", topic=topics.name("completions"))
                == 1
            ),
            what="the duplicate to be dropped",
        )
    assert len(seen) == 1


def test_sigterm_finishes_in_flight_work_and_commits(kafka, topics, tmp_path):
    env = {**os.environ, "BOOTSTRAP": kafka.bootstrap_servers, "PREFIX": topics.prefix}
    started = tmp_path / "started"
    proc = subprocess.Popen(
        [sys.executable, str(HERE / "_echo_worker.py"), "--slow", "3", "--mark", str(started)],
        env=env,
    )
    Producer(kafka).send_sync(topics.name("prompts"), m.Prompt(text="in flight"))
    wait_until(started.exists, timeout=60, what="the handler to start")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0
    assert len(wait_records(kafka, topics.name("completions"), m.CompletionGroup, 1)) == 1
    assert sum(committed(kafka, f"{topics.prefix}echo", topics.name("prompts")).values()) == 1


def test_service_server_is_ready_only_while_connected(kafka, topics):
    import httpx

    from onpolicy.settings import HttpSettings
    from onpolicy.telemetry import ServiceServer

    metrics = Metrics("test")
    processor = make_processor(kafka, topics, lambda r: [], metrics=metrics)
    server = ServiceServer("test", metrics, HttpSettings(host="127.0.0.1", port=0))
    server.add_check("kafka", lambda: processor.kafka_connected)
    server.start()
    try:
        url = f"http://127.0.0.1:{server.port}"
        assert httpx.get(f"{url}/readyz").status_code == 503  # not consuming yet
        assert httpx.get(f"{url}/healthz").json()["status"] == "ok"
        with running(processor):
            wait_until(lambda: httpx.get(f"{url}/readyz").status_code == 200, 30, "ready")
            assert httpx.get(f"{url}/readyz").json() == {"ready": True, "checks": {"kafka": True}}
            assert b"onpolicy_test_" in httpx.get(f"{url}/metrics").content
    finally:
        server.stop()


def test_a_group_join_finished_between_polls_is_applied(kafka, topics):
    """kafka-python 3.0.12 drops a join that finishes while no poll awaits it; when a metadata
    change started that join (here: partitions added to the topic), the member then never
    applies it, so never reads the new partitions, cannot commit and is evicted
    (``onpolicy.bus._kafka_fixes``). Reproduced step by step with a plain consumer."""
    topic = topics.name("prompts")
    consumer = KafkaConsumer(
        topic,
        **kafka.client_config(),
        group_id=f"{topics.prefix}join",
        session_timeout_ms=kafka.session_timeout_ms,
        heartbeat_interval_ms=kafka.heartbeat_interval_ms,
        max_poll_interval_ms=kafka.max_poll_interval_ms,
        metadata_max_age_ms=300,  # sees the new partition without being polled
        enable_auto_commit=False,
    )
    coordinator = consumer._coordinator
    try:
        wait_until(
            lambda: consumer.poll(timeout_ms=200) is not None and consumer.assignment(),
            what="the consumer joins",
        )
        admin = KafkaAdminClient(**kafka.client_config())
        try:
            admin.create_partitions({topic: 3})
        finally:
            admin.close()
        # The leader (the only member) must rejoin to assign partition 2; nothing flags it.
        wait_until(
            lambda: coordinator._assignment_snapshot != coordinator._metadata_snapshot,
            what="the consumer sees the new partition",
        )
        consumer.poll(timeout_ms=1)  # starts that join and gives up before it finishes
        wait_until(lambda: coordinator._join_task.is_done, what="the join finishes unawaited")

        offsets = {TopicPartition(topic, 2): OffsetAndMetadata(0, "", -1)}

        def commits_on_the_new_partition() -> bool:
            consumer.poll(timeout_ms=200)
            try:
                consumer.commit(offsets)
            except KafkaError:
                return False
            return True

        # Unpatched, the consumer keeps its two old partitions and no generation it can commit
        # in, until the test gives up.
        wait_until(commits_on_the_new_partition, timeout=30, what="the join applied")
        assert consumer.assignment() == {TopicPartition(topic, p) for p in range(3)}
    finally:
        consumer.close()


def test_the_poll_loop_waits_when_idle_or_full_and_resumes_when_a_record_finishes(
    kafka, topics, monkeypatch
):
    """Polls every 100 ms woke the service ~70 times a second with nothing to do, CPU a
    trainer's training steps paid for; now an idle poll waits ``poll_timeout_s`` and a full
    window sleeps until one of its records finishes."""
    polls: list[float] = []
    real_poll = KafkaConsumer.poll

    def counting_poll(self, *args, **kwargs):
        if self is processor._consumer:
            polls.append(time.monotonic())
        return real_poll(self, *args, **kwargs)

    monkeypatch.setattr(KafkaConsumer, "poll", counting_poll)
    release = threading.Event()

    def handler(record):
        if record.message.text == "held":
            release.wait(60)
        return [Output(topics.name("completions"), echo_group(record.message))]

    processor = make_processor(kafka, topics, handler, concurrency=1, poll_timeout_s=1.0)

    def polls_during(seconds: float) -> int:
        start = time.monotonic()
        time.sleep(seconds)
        return sum(1 for t in polls if start <= t < start + seconds)

    producer = Producer(kafka)
    try:
        with running(processor):
            wait_until(lambda: processor.kafka_connected and polls, 30, "the processor polls")
            wait_until(lambda: processor._consumer.assignment(), 30, "partitions assigned")
            # The 100 ms loop polled ~30 times in 3 s; one poll a second now (+1 at the edges).
            assert polls_during(3.0) <= 4

            producer.send_sync(topics.name("prompts"), m.Prompt(text="held"))
            producer.send_sync(topics.name("prompts"), m.Prompt(text="next"))
            wait_until(lambda: processor._offsets.in_flight() == 1, 30, "the window is full")
            assert polls_during(3.0) <= 4  # full: no busy polling while the record is held

            release.set()
            records = wait_records(kafka, topics.name("completions"), m.CompletionGroup, 2)
            assert sorted(r.message.prompt.text for r in records) == ["held", "next"]
            wait_until(
                lambda: (
                    sum(
                        committed(kafka, processor.config.group_id, topics.name("prompts")).values()
                    )
                    == 2
                ),
                what="both records committed",
            )
    finally:
        producer.close()


def test_a_fence_holds_each_partition_at_its_offset_until_it_moves(kafka, topics):
    """The round protocol's fence: nothing at or past it is handled or committed; records
    before it on other partitions flow meanwhile; moving it releases the held records."""
    raw = KafkaProducer(bootstrap_servers=kafka.bootstrap_servers)
    for i in range(6):
        for partition in (0, 1):
            value, headers = encode(m.validate(m.Prompt(text=f"q{partition}-{i}")))
            raw.send(topics.name("prompts"), value, headers=headers, partition=partition).get(30)
    raw.close()
    fences = {0: 2, 1: 4}
    handled: list[str] = []

    def handler(record):
        handled.append(record.message.text)
        return []

    processor = Processor(
        kafka=kafka,
        source=topics.name("prompts"),
        message_type=m.Prompt,
        handler=handler,
        # A window wider than a fence: the fence, not the window, is what stops it.
        config=ProcessorConfig(group_id=f"{topics.prefix}fenced", concurrency=16),
        metrics=Metrics("test"),
        dead_letter_topic=topics.name("dlq"),
        fence=lambda partition: fences[partition],
    )
    group = f"{topics.prefix}fenced"
    source = topics.name("prompts")
    with running(processor):
        wait_until(lambda: len(handled) == 6, 30, "records below the fences")
        time.sleep(2)  # more polls: still nothing past the fences
        assert sorted(handled) == sorted(
            [f"q0-{i}" for i in range(2)] + [f"q1-{i}" for i in range(4)]
        )
        wait_until(lambda: committed(kafka, group, source) == {0: 2, 1: 4}, 30, "commits")
        fences[0] = 6
        wait_until(lambda: len(handled) == 10, 30, "partition 0 released")
        assert committed(kafka, group, source).get(1) == 4
        fences[1] = 6
        wait_until(lambda: len(handled) == 12, 30, "partition 1 released")
        wait_until(lambda: committed(kafka, group, source) == {0: 6, 1: 6}, 30, "commits")
    assert len(set(handled)) == 12  # each once


def test_a_paused_partition_with_parked_records_is_fetched_again_once_resumed(kafka, topics):
    """kafka-python 3.0.12 parks the records it fetched for a partition that is then paused,
    and restores them on resume only into an empty in-line slot, which it leaves holding a
    drained (falsy, not None) batch once another partition's records went through: the
    resumed partition then never returns a record again (``onpolicy.bus._kafka_fixes``).
    This is what the processor does at a fence: pause a partition mid-batch, rewind it."""
    source = topics.name("prompts")
    raw = KafkaProducer(bootstrap_servers=kafka.bootstrap_servers)
    for partition in (0, 1):
        for i in range(6):
            raw.send(source, f"{partition}-{i}".encode(), partition=partition).get(30)
    consumer = KafkaConsumer(**kafka.client_config(), group_id=None, enable_auto_commit=False)
    p0, p1 = TopicPartition(source, 0), TopicPartition(source, 1)
    consumer.assign([p0, p1])
    consumer.seek_to_beginning(p0, p1)
    try:
        held = None
        deadline = time.monotonic() + 30
        while held is None and time.monotonic() < deadline:
            for tp, records in consumer.poll(timeout_ms=500, max_records=1).items():
                if tp == p1:  # its batch's other records wait in the in-line slot
                    held = records[0].offset
                    consumer.seek(p1, held)
                    consumer.pause(p1)
        assert held is not None, "partition 1 returned nothing"
        for i in range(3):  # partition 0's records go through the slot meanwhile
            raw.send(source, f"0-late-{i}".encode(), partition=0).get(30)
        late = []
        deadline = time.monotonic() + 30
        while len(late) < 3 and time.monotonic() < deadline:
            for tp, records in consumer.poll(timeout_ms=500).items():
                assert tp == p0
                late += [r.value for r in records if r.value.startswith(b"0-late")]
        assert len(late) == 3
        consumer.resume(p1)
        again = []
        deadline = time.monotonic() + 15
        while len(again) < 6 - held and time.monotonic() < deadline:
            for records in consumer.poll(timeout_ms=500).values():
                again += [r.offset for r in records]
        assert again == list(range(held, 6)), again
    finally:
        consumer.close(autocommit=False)
        raw.close()


def test_records_held_for_later_work_are_let_go_at_stop_and_redelivered(kafka, topics):
    """A handler holding its record for work that has not started (the trainer's pairs
    waiting for a round) is let go by ``on_stop``: the stop takes moments, not the drain
    timeout, the finished record commits, and the held one is handled by the next owner."""
    import asyncio

    waiting: list[asyncio.Future] = []

    async def holding(record):
        if record.message.text == "held":
            future = asyncio.get_running_loop().create_future()
            waiting.append(future)
            await future  # resolved by nothing: only the stop lets it go
        return [Output(topics.name("completions"), echo_group(record.message))]

    def let_go():
        loop = processor.handler_loop
        loop.call_soon_threadsafe(lambda: [f.cancel() for f in waiting])

    processor = Processor(
        kafka=kafka,
        source=topics.name("prompts"),
        message_type=m.Prompt,
        handler=holding,
        config=ProcessorConfig(group_id=f"{topics.prefix}g", concurrency=4, drain_timeout_s=30.0),
        metrics=Metrics("test"),
        dead_letter_topic=topics.name("dlq"),
        on_stop=let_go,
    )
    raw = KafkaProducer(bootstrap_servers=kafka.bootstrap_servers)
    for text in ["done", "held"]:
        value, headers = encode(m.validate(m.Prompt(text=text)))
        raw.send(topics.name("prompts"), value, headers=headers, partition=0).get(30)
    raw.close()
    with running(processor):
        wait_records(kafka, topics.name("completions"), m.CompletionGroup, 1)
        wait_until(lambda: waiting, what="the held record's handler")
        stopped = time.monotonic()
    assert time.monotonic() - stopped < 10, "the stop waited for the held record"
    # Only the finished record's offset commits: the held one stays for the next owner.
    assert committed(kafka, processor.config.group_id, topics.name("prompts")).get(0) == 1

    def finish(record):
        return [Output(topics.name("completions"), echo_group(record.message))]

    with running(make_processor(kafka, topics, finish)):
        groups = wait_records(kafka, topics.name("completions"), m.CompletionGroup, 2)
    assert sorted(g.message.prompt.text for g in groups) == ["done", "held"]
