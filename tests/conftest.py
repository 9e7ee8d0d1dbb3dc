"""Fixtures shared by every level: a real Kafka broker and a real vLLM server.

Both come from the local stack (``onpolicy.stack``), started once per test session on free
ports with their state in a temporary folder, and stopped at the end. Set
``ONPOLICY_TEST_BOOTSTRAP`` to run against a broker that already runs instead.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from onpolicy.bus import ensure_topics
from onpolicy.settings import KafkaSettings, TopicSettings


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def stack_settings(tmp_path_factory: pytest.TempPathFactory):
    from onpolicy.stack import StackSettings

    state = tmp_path_factory.mktemp("stack")
    # One server for both hand-off modes: LoRA for the adapter tests, dev mode for the merged
    # reloads (tests/integration/test_handoff.py), so the session starts one vLLM (a server
    # without LoRA compiles for minutes more; the handoff benchmark measures that one).
    return StackSettings(
        state_dir=state,
        kafka_port=free_port(),
        kafka_controller_port=free_port(),
        vllm_port=free_port(),
        handoff="lora",
        vllm_dev_mode=True,
    )


@pytest.fixture(scope="session")
def kafka_bootstrap(stack_settings) -> Iterator[str]:
    if external := os.environ.get("ONPOLICY_TEST_BOOTSTRAP"):
        yield external
        return
    from onpolicy.stack import KafkaBroker

    broker = KafkaBroker(stack_settings)
    broker.start()
    try:
        yield broker.bootstrap
    finally:
        broker.stop()


@pytest.fixture(scope="session")
def kafka(kafka_bootstrap: str) -> KafkaSettings:
    # Short group timeouts keep rebalances (and so the tests) fast.
    return KafkaSettings(
        bootstrap_servers=kafka_bootstrap,
        session_timeout_ms=6000,
        heartbeat_interval_ms=500,
        max_poll_interval_ms=20_000,
        linger_ms=0,
    )


@pytest.fixture
def topics(kafka: KafkaSettings) -> TopicSettings:
    """A fresh set of the pipeline's topics for one test (unique prefix)."""
    settings = TopicSettings(prefix=f"test-{uuid.uuid4().hex[:8]}.", partitions=2)
    ensure_topics(kafka, settings)
    return settings


@pytest.fixture(scope="session")
def model_dir(stack_settings) -> Path:
    from onpolicy.stack import ensure_default_model

    return ensure_default_model(stack_settings)


@pytest.fixture(scope="session")
def vllm(stack_settings, model_dir: Path):
    """The session's vLLM server object (tests may stop and restart it)."""
    from onpolicy.stack import VllmServer

    server = VllmServer(stack_settings, model_dir)
    try:
        server.start()  # a start that times out must not leave the server running
        yield server
    finally:
        server.stop()


@pytest.fixture
def vllm_server(vllm) -> str:
    """URL of a running vLLM server for the default model (restarted if a test stopped it)."""
    vllm.start()
    return vllm.url
