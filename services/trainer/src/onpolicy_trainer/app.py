"""Wiring: the processor over the pairs topic, the round runner, and the HTTP control routes."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Query, Response

from onpolicy import messages as m
from onpolicy.bus import Processor, ProcessorConfig, Producer
from onpolicy.telemetry import Metrics, ServiceServer
from onpolicy_trainer.launch import train_fn
from onpolicy_trainer.rounds import RoundRunner
from onpolicy_trainer.settings import TrainerSettings


def add_routes(server: ServiceServer, runner: RoundRunner) -> None:
    def list_rounds() -> dict[str, Any]:
        return {"current_version": runner.current, "rounds": [r.as_dict() for r in runner.rounds]}

    def trigger(
        response: Response, max_pairs: Annotated[int | None, Query(ge=1)] = None
    ) -> dict[str, Any]:
        result = runner.trigger_threadsafe(max_pairs=max_pairs)
        response.status_code = 202 if result["triggered"] else 409
        return result

    server.app.add_api_route("/rounds", list_rounds, methods=["GET"])
    server.app.add_api_route("/rounds/trigger", trigger, methods=["POST"])
    server.app.add_api_route("/policy", runner.policy, methods=["GET"])


def build(
    settings: TrainerSettings, metrics: Metrics, server: ServiceServer
) -> Processor[m.PreferencePair]:
    """The trainer's processor; recovers the current version before consuming."""
    producer = Producer(settings.kafka, client_id=settings.group_id)
    runner = RoundRunner(settings, metrics, producer, train=train_fn(settings))
    runner.recover()
    processor = Processor(
        kafka=settings.kafka,
        source=settings.topics.name("pairs"),
        message_type=m.PreferencePair,
        handler=runner.handle,
        # One round's worth in flight: while a full round trains, the window is full and the
        # consumer is paused, so the next round's pairs wait in Kafka (fetched in moments once
        # the round publishes) instead of being fetched during training. Fetching beside a
        # round on the CPU costs its training steps: the consumer's long polls and the
        # broker's fetch handling take turns on the cores the steps use.
        config=ProcessorConfig(
            group_id=settings.group_id,
            concurrency=settings.round_size,
            drain_timeout_s=settings.drain_timeout_s,
        ),
        metrics=metrics,
        dead_letter_topic=settings.topics.name("dlq"),
        producer=producer,
    )
    runner.stopping = processor.stopping  # SIGTERM cuts a running round short
    processor.runner = runner  # type: ignore[attr-defined]  # for tests and the e2e loop
    server.add_check("store", lambda: runner.store.fs.exists(runner.store.root))
    add_routes(server, runner)
    return processor
