"""The judge service: CompletionGroups in, one ScoredGroup and its PreferencePairs out."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from onpolicy import messages as m
from onpolicy.bus import Output, Processor, ProcessorConfig, Producer, Record
from onpolicy.telemetry import Metrics, ServiceServer
from onpolicy_judge.grpc_server import GrpcServer
from onpolicy_judge.judge import Judge, build_judge
from onpolicy_judge.metrics import JudgeMetrics
from onpolicy_judge.runtime import JudgeRuntime
from onpolicy_judge.settings import JudgeSettings

log = logging.getLogger(__name__)


class JudgeProcessor(Processor[m.CompletionGroup]):
    """The stream processor, plus the judge's loop and gRPC server for as long as it runs."""

    def __init__(
        self,
        *,
        settings: JudgeSettings,
        judge: Judge,
        runtime: JudgeRuntime,
        metrics: Metrics,
        producer: Producer | None = None,
    ):
        self.settings = settings
        self.judge = judge
        self.runtime = runtime
        self.grpc = GrpcServer(judge, settings.grpc) if settings.grpc.enabled else None
        self.scored_topic = settings.topics.name("scored")
        self.pairs_topic = settings.topics.name("pairs")
        super().__init__(
            kafka=settings.kafka,
            source=settings.topics.name("completions"),
            message_type=m.CompletionGroup,
            handler=self.handle,
            config=ProcessorConfig(
                group_id=settings.group_id,
                concurrency=settings.concurrency,
                max_attempts=settings.max_attempts,
                max_transient_attempts=settings.max_transient_attempts,
                retry_backoff_s=settings.retry_backoff_s,
                max_backoff_s=settings.max_backoff_s,
                breaker_failures=settings.breaker_failures,
                breaker_reset_s=settings.breaker_reset_s,
                breaker_max_reset_s=settings.breaker_max_reset_s,
            ),
            metrics=metrics,
            dead_letter_topic=settings.topics.name("dlq"),
            producer=producer,
        )

    async def handle(self, record: Record[m.CompletionGroup]) -> Sequence[Output]:
        scored, pairs = await self.runtime.call(self.judge.evaluate(record.message))
        return [Output(self.scored_topic, scored), *(Output(self.pairs_topic, p) for p in pairs)]

    def run(self, install_signal_handlers: bool = True) -> None:
        if self.grpc is not None:
            self.runtime.run(self.grpc.start(), timeout=30)
        try:
            super().run(install_signal_handlers)
        finally:
            if self.grpc is not None:
                self.runtime.run(self.grpc.stop(), timeout=30)
            self.runtime.run(self.judge.aclose(), timeout=30)
            self.runtime.stop()


def build(
    settings: JudgeSettings,
    metrics: Metrics,
    server: ServiceServer,
    judge: Judge | None = None,
) -> JudgeProcessor:
    """The judge service; ``judge`` replaces the one the settings describe (tests, embedding)."""
    judge = judge or build_judge(settings, JudgeMetrics(metrics))
    processor = JudgeProcessor(
        settings=settings, judge=judge, runtime=JudgeRuntime(), metrics=metrics
    )
    # Not ready while the backend is down or refuses requests (consumption is paused then).
    server.add_check("judge", lambda: processor.backend_ok)

    def info() -> dict[str, object]:
        return {
            "judge_id": judge.judge_id,
            "backend": settings.backend,
            "pairs": settings.pairs.model_dump(),
            "grpc_port": processor.grpc.port if processor.grpc else None,
            "paused": processor.paused_reason,
            "circuit": processor.breaker.state.name.lower(),
        }

    server.app.add_api_route("/judge", info, methods=["GET"])
    log.info("judge %s (%s backend)", judge.judge_id, settings.backend)
    return processor
