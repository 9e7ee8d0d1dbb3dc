"""The services as child processes of ``onpolicy run`` (same interpreter, own logs)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from onpolicy.secrets import open_private


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class ServiceProcess:
    name: str  # sampler | judge | trainer
    log_file: Path
    env: dict[str, str]
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        env = {
            **os.environ,
            **self.env,
            f"ONPOLICY_{self.name.upper()}_HTTP__PORT": str(self.port),
            f"ONPOLICY_{self.name.upper()}_HTTP__HOST": "127.0.0.1",
        }
        self.log = open_private(self.log_file, "ab")  # closed in stop
        self.proc = subprocess.Popen(
            [sys.executable, "-m", f"onpolicy_{self.name}"],
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def get(self, path: str, timeout: float = 5.0) -> httpx.Response:
        return httpx.get(self.url + path, timeout=timeout)

    def post(self, path: str, timeout: float = 30.0) -> httpx.Response:
        return httpx.post(self.url + path, timeout=timeout)

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
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.log.close()
        return self.proc.returncode


class ServiceDied(RuntimeError):
    pass


def wait_for(
    check, timeout: float, what: str, services: list[ServiceProcess], interval: float = 0.5
) -> float:
    """Poll ``check`` until true; fail fast (with its log) if a service died meanwhile."""
    started = time.monotonic()
    while True:
        if check():
            return time.monotonic() - started
        for service in services:
            if not service.alive():
                raise ServiceDied(
                    f"{service.name} exited while waiting for {what}; "
                    f"log {service.log_file}:\n{service.log_tail()}"
                )
        if time.monotonic() - started > timeout:
            raise TimeoutError(f"gave up waiting {timeout:.0f}s for {what}")
        time.sleep(interval)
