"""One logging setup, one metrics helper and the service HTTP server.

Every service serves ``/metrics`` (Prometheus text), ``/healthz`` (the process is alive) and
``/readyz`` (every readiness check passes: connected to Kafka and to its backend) from a
FastAPI app run by uvicorn in a background thread, so the Kafka loop owns the main thread.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import uvicorn
from fastapi import FastAPI, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from pythonjsonlogger.json import JsonFormatter

from onpolicy.settings import HttpSettings, LogSettings

log = logging.getLogger(__name__)

NAMESPACE = "onpolicy"
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


def setup_logging(settings: LogSettings, service: str) -> None:
    """Configure the root logger once: plain text for people, JSON lines for log shippers."""
    handler = logging.StreamHandler(sys.stderr)
    if settings.json_format:
        handler.setFormatter(
            JsonFormatter(
                "%(asctime)s %(levelname)s %(name)s %(message)s",
                rename_fields={"levelname": "level", "asctime": "time"},
                static_fields={"service": service},
            )
        )
    else:
        handler.setFormatter(
            logging.Formatter(f"%(asctime)s %(levelname)-7s {service} %(name)s: %(message)s")
        )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.level)
    for noisy in ("kafka", "httpx", "uvicorn.access"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
    # kafka-python warns about its own event-loop stalls (slow CPUs): not actionable here.
    logging.getLogger("kafka.net.selector").setLevel(logging.ERROR)


class Metrics:
    """A service's metrics in their own registry, all named ``onpolicy_<service>_...``."""

    def __init__(self, service: str, registry: CollectorRegistry | None = None):
        self.service = service
        self.registry = registry or CollectorRegistry()
        self._made: dict[str, Any] = {}

    def _get(self, kind: type, name: str, doc: str, labels: tuple[str, ...], **kw: Any) -> Any:
        # Idempotent: a second component asking for the same metric shares it.
        full = f"{NAMESPACE}_{self.service}_{name}"
        if full not in self._made:
            self._made[full] = kind(full, doc, labels, registry=self.registry, **kw)
        return self._made[full]

    def counter(self, name: str, doc: str, labels: tuple[str, ...] = ()) -> Counter:
        return self._get(Counter, name, doc, labels)

    def gauge(self, name: str, doc: str, labels: tuple[str, ...] = ()) -> Gauge:
        return self._get(Gauge, name, doc, labels)

    def histogram(
        self,
        name: str,
        doc: str,
        labels: tuple[str, ...] = (),
        buckets: tuple[float, ...] = LATENCY_BUCKETS,
    ) -> Histogram:
        return self._get(Histogram, name, doc, labels, buckets=buckets)

    def render(self) -> bytes:
        return generate_latest(self.registry)


ReadinessCheck = Callable[[], bool]


class ServiceServer:
    """The FastAPI app of a service, served by uvicorn on a daemon thread."""

    def __init__(self, service: str, metrics: Metrics, settings: HttpSettings):
        self.service = service
        self.metrics = metrics
        self.settings = settings
        self.checks: dict[str, ReadinessCheck] = {}
        self.started = time.time()
        self.app = FastAPI(title=f"onpolicy {service}", version="0.1.0")
        self.app.add_api_route("/metrics", self._metrics, methods=["GET"])
        self.app.add_api_route("/healthz", self._healthz, methods=["GET"])
        self.app.add_api_route("/readyz", self._readyz, methods=["GET"])
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    def add_check(self, name: str, check: ReadinessCheck) -> None:
        self.checks[name] = check

    def _metrics(self) -> Response:
        return Response(self.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    def _healthz(self) -> dict[str, object]:
        return {"status": "ok", "service": self.service, "uptime_s": time.time() - self.started}

    def _readyz(self, response: Response) -> dict[str, object]:
        results: dict[str, bool] = {}
        for name, check in self.checks.items():
            try:
                results[name] = bool(check())
            except Exception:  # a failing check means not ready, never a 500
                results[name] = False
        ready = all(results.values())
        response.status_code = 200 if ready else 503
        return {"ready": ready, "checks": results}

    @property
    def port(self) -> int:
        """The bound port (useful when the settings asked for port 0)."""
        if self._server and self._server.servers:
            return self._server.servers[0].sockets[0].getsockname()[1]
        return self.settings.port

    def start(self) -> None:
        config = uvicorn.Config(
            self.app,
            host=self.settings.host,
            port=self.settings.port,
            log_level="warning",
            lifespan="off",
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, name="http", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started and time.monotonic() < deadline:
            time.sleep(0.02)
        log.info("%s serving /metrics /healthz /readyz on port %d", self.service, self.port)

    def stop(self) -> None:
        if self._server:
            self._server.should_exit = True
        if self._thread:
            self._thread.join(timeout=5)
