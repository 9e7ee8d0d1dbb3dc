"""The services as child processes of ``onpolicy run`` (same interpreter, own logs).

They are supervised the way Kubernetes supervises a pod's containers (``restartPolicy:
Always``): a service that exits while the run needs it (a crash, an OOM kill, ``kill -9``)
is started again after a back-off that doubles with each quick crash (``backoff_s`` up to
``max_backoff_s``; a process that ran ``reset_after_s`` counts as healthy again), and the run
goes on: the work it had in flight was not committed, so Kafka redelivers it to the new
process. Each restart is recorded (service, exit code, time) for the run's report. Past
``max_restarts`` restarts of one service, or an exit with status 2 (its settings are
invalid: a restart cannot help), the run stops with :class:`ServiceDied` naming the service,
its exit codes and its log's last lines.

Supervision is polled: :func:`wait_for`, which every stage of the run waits in, calls
:meth:`ServiceProcess.supervise` of each service at every poll.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import httpx

from onpolicy.secrets import open_private

log = logging.getLogger(__name__)

BAD_SETTINGS_EXIT = 2  # service_main's exit status for invalid settings


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass(frozen=True)
class RestartPolicy:
    max_restarts: int = 5  # per service and run; 0: a crash ends the run
    backoff_s: float = 1.0  # before the first restart; doubles with each quick crash
    max_backoff_s: float = 30.0
    reset_after_s: float = 60.0  # a process that ran this long starts the back-off afresh


@dataclass(frozen=True)
class Restart:
    """One restart of a service, as the run's report lists it."""

    service: str
    exit_code: int | None  # negative: killed by that signal (-9 SIGKILL)
    exited_at: str  # UTC, ISO 8601, when the exit was seen
    uptime_s: float  # how long the process had run
    backoff_s: float  # waited before starting it again
    restart: int  # 1 for the first restart of this service


class ServiceDied(RuntimeError):
    pass


@dataclass
class ServiceProcess:
    name: str  # sampler | judge | trainer
    log_file: Path
    env: dict[str, str]
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen | None = None
    policy: RestartPolicy = field(default_factory=RestartPolicy)
    command: list[str] | None = None  # default: python -m onpolicy_<name>
    restarts: list[Restart] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.log = None
        self._started_at = 0.0
        self._restart_at: float | None = None  # a crashed process waits for its back-off
        self._quick_crashes = 0
        self._stopping = False

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self._stopping = False
        if self.log is None:
            self.log = open_private(self.log_file, "ab")  # closed in stop
        self._spawn()

    def _spawn(self) -> None:
        env = {
            **os.environ,
            **self.env,
            f"ONPOLICY_{self.name.upper()}_HTTP__PORT": str(self.port),
            f"ONPOLICY_{self.name.upper()}_HTTP__HOST": "127.0.0.1",
        }
        self.proc = subprocess.Popen(
            self.command or [sys.executable, "-m", f"onpolicy_{self.name}"],
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        self._started_at = time.monotonic()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def restarting(self) -> bool:
        """Crashed and waiting for its back-off before it is started again."""
        return self._restart_at is not None

    def supervise(self) -> None:
        """Restart the process if it exited (after its back-off); :class:`ServiceDied` when
        it may not be restarted any more. Cheap: call it at every poll."""
        if self.proc is None or self._stopping:
            return
        now = time.monotonic()
        if self._restart_at is not None:
            if now >= self._restart_at:
                self._restart_at = None
                self._spawn()
            return
        code = self.proc.poll()
        if code is None:
            return
        uptime = now - self._started_at
        if code == BAD_SETTINGS_EXIT:
            raise ServiceDied(
                f"{self.name} exited with {code} (invalid settings): not restarted; "
                f"log {self.log_file}:\n{self.log_tail()}"
            )
        if len(self.restarts) >= self.policy.max_restarts:
            codes = [r.exit_code for r in self.restarts] + [code]
            raise ServiceDied(
                f"{self.name} exited with {code} after {uptime:.0f}s and was restarted "
                f"{len(self.restarts)} times already (max_restarts "
                f"{self.policy.max_restarts}; exit codes {codes}); log {self.log_file}:\n"
                f"{self.log_tail()}"
            )
        if uptime >= self.policy.reset_after_s:
            self._quick_crashes = 0
        backoff = min(self.policy.backoff_s * 2**self._quick_crashes, self.policy.max_backoff_s)
        self._quick_crashes += 1
        restart = Restart(
            service=self.name,
            exit_code=code,
            exited_at=datetime.now(UTC).isoformat(timespec="seconds"),
            uptime_s=round(uptime, 1),
            backoff_s=backoff,
            restart=len(self.restarts) + 1,
        )
        self.restarts.append(restart)
        log.warning(
            "%s exited with %s after %.0fs; restarting it in %.1fs (restart %d of at most %d)",
            self.name,
            code,
            uptime,
            backoff,
            restart.restart,
            self.policy.max_restarts,
        )
        if self.log is not None:
            self.log.write(
                f"--- onpolicy run: {self.name} exited with {code} at {restart.exited_at}; "
                f"restart {restart.restart} in {backoff:.1f}s ---\n".encode()
            )
            self.log.flush()
        self._restart_at = now + backoff

    def get(self, path: str, timeout: float = 5.0) -> httpx.Response:
        return httpx.get(self.url + path, timeout=timeout)

    def post(self, path: str, timeout: float = 30.0) -> httpx.Response:
        return httpx.post(self.url + path, timeout=timeout)

    def metric(self, name: str, **labels: str) -> float:
        """One sample of the service's /metrics (0 when it has none yet)."""
        from prometheus_client.parser import text_string_to_metric_families

        for family in text_string_to_metric_families(self.get("/metrics").text):
            for sample in family.samples:
                if sample.name == name and all(
                    sample.labels.get(k) == v for k, v in labels.items()
                ):
                    return float(sample.value)
        return 0.0

    def ready(self) -> bool:
        try:
            return self.get("/readyz", timeout=3).status_code == 200
        except httpx.HTTPError:
            return False

    def log_tail(self, lines: int = 25) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self, timeout: float = 60.0) -> int | None:
        self._stopping = True  # an exit from here on is no crash
        self._restart_at = None
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if self.log is not None:
            self.log.close()
            self.log = None
        return self.proc.returncode


def wait_for(
    check, timeout: float, what: str, services: list[ServiceProcess], interval: float = 0.5
) -> float:
    """Poll ``check`` until true, supervising ``services`` meanwhile (a crashed one is
    restarted; :class:`ServiceDied` when it may not be). A check that cannot reach a service
    (it is restarting) counts as not yet."""
    started = time.monotonic()
    last_error: Exception | None = None
    while True:
        for service in services:
            service.supervise()
        try:
            if check():
                return time.monotonic() - started
        except httpx.HTTPError as exc:
            last_error = exc
        if time.monotonic() - started > timeout:
            detail = f" (last error: {last_error!r})" if last_error is not None else ""
            raise TimeoutError(f"gave up waiting {timeout:.0f}s for {what}{detail}")
        time.sleep(interval)
