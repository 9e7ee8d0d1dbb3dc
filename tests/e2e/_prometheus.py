"""A real Prometheus (Debian's ``prometheus`` binary) scraping a run of the loop, and the
Grafana dashboard's queries evaluated through its HTTP API.

The services' ports are known only once a lineage of the run is built, so the scrape config
reads them from a file_sd targets file that :meth:`Prometheus.watch` fills in as each lineage
starts. Grafana's variables are replaced as Grafana would with a data source whose scrape
interval is :data:`SCRAPE_S` and the ``$model`` variable on "All".
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

SCRAPE_S = 1
STEP_S = 2  # query_range step, Grafana's $__interval
# Grafana: $__rate_interval = max($__interval + scrape interval, 4 * scrape interval).
RATE_INTERVAL = f"{max(STEP_S + SCRAPE_S, 4 * SCRAPE_S)}s"
# What Grafana puts in a query for each dashboard variable ($model: "All", its allValue).
VARIABLES = {
    "__rate_interval": RATE_INTERVAL,
    "__interval": f"{STEP_S}s",
    "__range": "1h",
    "model": ".*",
}


def substitute(expr: str) -> str:
    """Grafana's variables in a query, replaced; an unknown one fails the test."""
    out = expr
    for name in sorted(VARIABLES, key=len, reverse=True):
        out = out.replace(f"${{{name}}}", VARIABLES[name]).replace(f"${name}", VARIABLES[name])
    assert "$" not in out, f"a Grafana variable the test does not know in {expr!r}"
    return out


@dataclass(frozen=True)
class Query:
    panel: str
    ref: str
    expr: str  # as in the dashboard
    instant: bool  # a table's instant query; the others are range queries

    @property
    def name(self) -> str:
        return f"{self.panel!r} {self.ref}"


def panel_queries(dashboard: dict[str, Any]) -> list[Query]:
    """Every target of every panel (rows' nested panels included)."""
    queries: list[Query] = []

    def walk(panels: list[dict[str, Any]]) -> None:
        for panel in panels:
            for t in panel.get("targets", []):
                instant = bool(t.get("instant")) and not t.get("range", False)
                queries.append(Query(panel["title"], t["refId"], t["expr"], instant))
            walk(panel.get("panels", []))

    walk(dashboard["panels"])
    return queries


def finite_values(result: dict[str, Any]) -> list[float]:
    """The finite sample values of a /api/v1/query or /query_range answer (NaN, from a
    histogram_quantile of no observations or a 0/0, is no data: Grafana draws nothing)."""
    data = result["data"]
    if data["resultType"] == "matrix":
        raw = [v for series in data["result"] for _, v in series["values"]]
    elif data["resultType"] == "vector":
        raw = [series["value"][1] for series in data["result"]]
    else:
        raw = [data["result"][1]]
    return [x for x in map(float, raw) if math.isfinite(x)]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def no_prometheus() -> None:
    """Without the prometheus binary: a skip locally, a failure in CI (CI=true), where
    .ci/run installs it, since a skipped check would pass CI silently."""
    reason = "no `prometheus` binary on PATH (apt-get install prometheus; .ci/run does)"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(reason, pytrace=False)
    pytest.skip(reason)


@dataclass
class Prometheus:
    """One prometheus process with its own TSDB in ``state``, on a free loopback port."""

    binary: str
    state: Path
    vllm_url: str
    port: int = field(default_factory=_free_port)
    targets: list[dict[str, Any]] = field(default_factory=list)
    started_at: float = 0.0  # first lineage's start (Unix time)
    stopped_at: dict[str, float] = field(default_factory=dict)  # lineage -> its stop

    def __post_init__(self) -> None:
        self.proc: subprocess.Popen | None = None
        self.targets_file = self.state / "targets.json"
        self.log_file = self.state / "prometheus.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self._write_targets()
        vllm = urlsplit(self.vllm_url).netloc
        config = {
            "global": {
                "scrape_interval": f"{SCRAPE_S}s",
                "scrape_timeout": f"{SCRAPE_S}s",
                "evaluation_interval": f"{SCRAPE_S}s",
            },
            "scrape_configs": [
                {
                    "job_name": "onpolicy",
                    "file_sd_configs": [
                        {"files": [str(self.targets_file)], "refresh_interval": "1s"}
                    ],
                },
                {"job_name": "vllm", "static_configs": [{"targets": [vllm]}]},
            ],
        }
        config_file = self.state / "prometheus.yml"
        config_file.write_text(json.dumps(config, indent=2))  # JSON is YAML
        self.log = self.log_file.open("ab")
        self.proc = subprocess.Popen(
            [
                self.binary,
                f"--config.file={config_file}",
                f"--storage.tsdb.path={self.state / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--storage.tsdb.retention.time=1d",
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"prometheus exited:\n{self.log_tail()}"
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/-/ready", timeout=2).status_code == 200:
                    return
            time.sleep(0.2)
        raise TimeoutError(f"prometheus not ready in 60 s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if self.proc is not None:
            self.log.close()

    def log_tail(self, lines: int = 20) -> str:
        return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])

    def _write_targets(self) -> None:
        tmp = self.targets_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.targets))
        tmp.replace(self.targets_file)  # file_sd must never read half a file

    @contextlib.contextmanager
    def watch(self) -> Iterator[None]:
        """While in this block, each lineage of a run registers its services as scrape
        targets when it starts, and waits, before its services stop, until Prometheus has
        scraped them twice more (their final values are in the TSDB)."""
        from onpolicy.run.lineage import Lineage

        start, stop = Lineage.start, Lineage.stop

        def watched_start(lineage: Lineage) -> None:
            for svc in lineage.services.values():
                self.targets.append(
                    {
                        "targets": [f"127.0.0.1:{svc.port}"],
                        "labels": {"service": svc.name, "lineage": lineage.name},
                    }
                )
            self._write_targets()
            self.started_at = self.started_at or time.time()
            start(lineage)

        def watched_stop(lineage: Lineage) -> None:
            time.sleep(2.5 * SCRAPE_S)
            self.stopped_at[lineage.name] = time.time()
            stop(lineage)

        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(Lineage, "start", watched_start)
            patch.setattr(Lineage, "stop", watched_stop)
            yield

    # ------------------------------------------------------------------ HTTP API
    def api(self, path: str, **params: Any) -> dict[str, Any]:
        response = httpx.get(f"{self.url}/api/v1/{path}", params=params, timeout=30)
        body = response.json()
        assert body.get("status") == "success", f"{path} {params}: {body}"
        return body

    def query(self, q: Query, start: float, end: float) -> dict[str, Any]:
        """The query as Grafana sends it: instant at ``end``, else a range over the run."""
        expr = substitute(q.expr)
        if q.instant:
            return self.api("query", query=expr, time=end)
        return self.api("query_range", query=expr, start=start, end=end, step=f"{STEP_S}s")
