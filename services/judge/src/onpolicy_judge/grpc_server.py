"""The synchronous ``onpolicy.v1.Judge/Score`` gRPC service plus the standard gRPC health.

For callers that want scores now rather than through Kafka, e.g. best-of-n at inference
time. It scores with the same judge object as the Kafka path, on the judge's loop.
"""

from __future__ import annotations

import logging

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from onpolicy.bus import ConfigurationError, TransientError
from onpolicy.serde import RecordError
from onpolicy.v1 import judge_pb2, judge_pb2_grpc
from onpolicy_judge.judge import Judge
from onpolicy_judge.settings import GrpcSettings

log = logging.getLogger(__name__)

SERVICE_NAME = judge_pb2.DESCRIPTOR.services_by_name["Judge"].full_name


class JudgeServicer(judge_pb2_grpc.JudgeServicer):
    def __init__(self, judge: Judge):
        self.judge = judge

    async def Score(
        self, request: judge_pb2.ScoreRequest, context: grpc.aio.ServicerContext
    ) -> judge_pb2.ScoreResponse:
        try:
            scored, pairs = await self.judge.evaluate(request.group)
        except RecordError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{exc.kind}: {exc}")
        except TransientError as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
        except ConfigurationError as exc:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        except Exception as exc:
            log.exception("Score failed")
            await context.abort(grpc.StatusCode.INTERNAL, repr(exc))
        return judge_pb2.ScoreResponse(scored=scored, pairs=pairs)


class GrpcServer:
    """A grpc.aio server; start and stop it on the judge's event loop."""

    def __init__(self, judge: Judge, settings: GrpcSettings):
        self.judge = judge
        self.settings = settings
        self.port = settings.port
        self._server: grpc.aio.Server | None = None
        self.health = health.aio.HealthServicer()

    async def start(self) -> int:
        server = self._server = grpc.aio.server()
        judge_pb2_grpc.add_JudgeServicer_to_server(JudgeServicer(self.judge), server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        self.port = server.add_insecure_port(f"{self.settings.host}:{self.settings.port}")
        await server.start()
        for name in ("", SERVICE_NAME):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info("gRPC %s and grpc.health.v1 on port %d", SERVICE_NAME, self.port)
        return self.port

    async def stop(self, grace: float = 5.0) -> None:
        if self._server is not None:
            await self.health.enter_graceful_shutdown()
            await self._server.stop(grace)
            self._server = None
