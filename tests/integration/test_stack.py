"""The local stack's Kafka broker and the `onpolicy up/status/down` commands."""

from __future__ import annotations

import base64
import os
import subprocess
import sys
import uuid

from onpolicy.run.procs import free_port
from onpolicy.stack import KafkaBroker, StackSettings
from onpolicy.stack.kafka import port_open


def test_broker_formats_even_when_the_cluster_id_starts_with_a_dash(tmp_path, monkeypatch):
    while True:  # a valid KRaft cluster id that argparse would read as an option
        cid = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if cid.startswith("-"):
            break
    monkeypatch.setattr("onpolicy.stack.kafka._cluster_id", lambda: cid)
    settings = StackSettings(
        state_dir=tmp_path, kafka_port=free_port(), kafka_controller_port=free_port()
    )
    broker = KafkaBroker(settings)
    try:
        broker.start()
        assert f"cluster.id={cid}" in (broker.data / "meta.properties").read_text()
    finally:
        broker.stop()
    assert not port_open("127.0.0.1", settings.kafka_port)


def test_both_broker_profiles_serve_and_small_runs_fewer_threads(tmp_path):
    from kafka import KafkaConsumer, KafkaProducer
    from kafka.admin import KafkaAdminClient, NewTopic

    threads = {}
    for profile in ("kafka", "small"):
        settings = StackSettings(
            state_dir=tmp_path / profile,
            kafka_port=free_port(),
            kafka_controller_port=free_port(),
            kafka_profile=profile,
        )
        broker = KafkaBroker(settings)
        try:
            broker.start()
            admin = KafkaAdminClient(bootstrap_servers=broker.bootstrap)
            admin.create_topics([NewTopic("t", num_partitions=1, replication_factor=1)])
            admin.close()
            producer = KafkaProducer(bootstrap_servers=broker.bootstrap)
            producer.send("t", key=b"k", value=profile.encode()).get(timeout=30)
            producer.close()
            consumer = KafkaConsumer(
                "t",
                bootstrap_servers=broker.bootstrap,
                auto_offset_reset="earliest",
                consumer_timeout_ms=20_000,
            )
            assert [r.value for r in consumer] == [profile.encode()]
            consumer.close()
            threads[profile] = len(os.listdir(f"/proc/{broker.process.pid()}/task"))
        finally:
            broker.stop()
    # Kafka's defaults: 3 network threads per listener, 8 request handlers, G1 and C2
    # compiler threads; the small profile keeps one or two of each.
    assert threads["small"] < threads["kafka"] - 20, threads


def test_up_status_down(tmp_path):
    port = free_port()
    env = {
        **os.environ,
        "ONPOLICY_STACK_STATE_DIR": str(tmp_path),
        "ONPOLICY_STACK_KAFKA_PORT": str(port),
        "ONPOLICY_STACK_KAFKA_CONTROLLER_PORT": str(free_port()),
        "ONPOLICY_STACK_VLLM_PORT": str(free_port()),
    }

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "onpolicy.cli", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=180,
        )

    up = cli("up", "--kafka-only")
    assert up.returncode == 0, up.stderr
    assert (
        f"ONPOLICY_KAFKA__BOOTSTRAP_SERVERS=127.0.0.1:{port}"
        in (tmp_path / "stack.env").read_text()
    )
    assert port_open("127.0.0.1", port)
    status = cli("status")
    assert status.returncode == 0 and "up" in status.stdout and "onpolicy.prompts" in status.stdout
    down = cli("down", "--wipe")
    assert down.returncode == 0 and "kafka stopped" in down.stderr
    assert not port_open("127.0.0.1", port)
    assert not (tmp_path / "kafka-data").exists()
