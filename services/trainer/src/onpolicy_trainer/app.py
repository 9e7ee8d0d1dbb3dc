"""Wiring: the processor over the pairs topic, the round runner, and the HTTP control routes."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Query, Response
from google.protobuf.json_format import MessageToDict

from onpolicy import messages as m
from onpolicy.bus import Processor, ProcessorConfig, Producer
from onpolicy.telemetry import Metrics, ServiceServer
from onpolicy_trainer import merge
from onpolicy_trainer.evaluation import Evaluator
from onpolicy_trainer.launch import train_fn
from onpolicy_trainer.planner import RoundPlanner
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

    def evals() -> dict[str, Any]:
        evaluator = runner.evaluator
        if evaluator is None:
            return {"enabled": False, "results": []}
        return {
            "enabled": True,
            "heldout_prompts": len(evaluator.heldout_ids),
            "results": [
                MessageToDict(evaluator.results[v], preserving_proto_field_name=True)
                for v in sorted(evaluator.results)
            ],
        }

    server.app.add_api_route("/evals", evals, methods=["GET"])


class TrainerProcessor(Processor[m.PreferencePair]):
    """The pairs processor; under the round protocol the planner runs beside it."""

    runner: RoundRunner
    planner: RoundPlanner | None = None

    def run(self, install_signal_handlers: bool = True) -> None:
        evaluator = self.runner.evaluator
        if evaluator is not None:
            evaluator.start()
        if self.planner is not None:
            self.planner.start()
        try:
            super().run(install_signal_handlers)
        finally:
            if self.planner is not None:
                self.planner.stop()
            if evaluator is not None:
                evaluator.stop()


def build(settings: TrainerSettings, metrics: Metrics, server: ServiceServer) -> TrainerProcessor:
    """The trainer's processor; recovers the current version before consuming."""
    if settings.handoff == "merged" and not settings.full_finetune:
        merge.import_libraries()  # at start, not in the first round (merge.py)
    producer = Producer(settings.kafka, client_id=settings.group_id)
    evaluator = Evaluator(settings, producer, metrics) if settings.evaluation.enabled else None
    runner = RoundRunner(settings, metrics, producer, train=train_fn(settings), evaluator=evaluator)
    runner.recover()
    processor = TrainerProcessor(
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
            # Planned rounds hold their pairs until every prompt is judged, and a round may
            # reach past round_size (the last prompts' pairs): room for a few rounds' worth.
            concurrency=settings.round_size * (4 if settings.round_protocol else 1),
            drain_timeout_s=settings.drain_timeout_s,
        ),
        metrics=metrics,
        dead_letter_topic=settings.topics.name("dlq"),
        producer=producer,
        on_stop=runner.release_waiting,
    )
    runner.stopping = processor.stopping  # SIGTERM cuts a running round short
    runner.bind(processor.handler_loop)
    if evaluator is not None and settings.evaluation.guard:
        evaluator.on_rejected = runner.rollback_threadsafe
    processor.runner = runner  # for tests and the e2e loop
    if settings.round_protocol:
        processor.planner = RoundPlanner(settings, runner, producer, metrics)
    server.add_check("store", lambda: runner.store.fs.exists(runner.store.root))
    if evaluator is not None:
        server.add_check("evaluator", evaluator.alive)
    add_routes(server, runner)
    return processor
