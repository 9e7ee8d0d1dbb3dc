"""Child processes of the local stack: started in their own session, tracked by pid file."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path


class StackError(RuntimeError):
    """The local stack could not be set up or started; the message says what to do."""


def run_checked(cmd: Sequence[str], what: str, **kwargs: object) -> None:
    result = subprocess.run(cmd, capture_output=True, text=True, **kwargs)  # type: ignore[call-overload]
    if result.returncode != 0:
        tail = (result.stdout + result.stderr).strip().splitlines()[-20:]
        raise StackError(f"{what} failed ({' '.join(map(str, cmd[:3]))} ...):\n" + "\n".join(tail))


class ManagedProcess:
    """A long-running child with a pid file and a log file under ``state``."""

    def __init__(self, name: str, state: Path):
        self.name = name
        self.pid_file = state / f"{name}.pid"
        self.log_file = state / f"{name}.log"

    def pid(self) -> int | None:
        proc = getattr(self, "_proc", None)
        if proc is not None and proc.poll() is not None:
            return None  # our own child has exited (it would linger as a zombie otherwise)
        try:
            pid = int(self.pid_file.read_text())
        except (OSError, ValueError):
            return None
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass
        return pid

    def running(self) -> bool:
        return self.pid() is not None

    def start(
        self, cmd: Sequence[str], env: dict[str, str] | None = None, cwd: Path | None = None
    ) -> int:
        self.pid_file.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_file, "ab") as log:
            proc = subprocess.Popen(
                list(cmd),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**os.environ, **(env or {})},
                cwd=cwd,
                start_new_session=True,  # outlives `onpolicy up`; stopped as a group
            )
        self.pid_file.write_text(str(proc.pid))
        self._proc = proc
        return proc.pid

    def exited(self) -> int | None:
        """The exit code if this object started the process and it has exited."""
        proc = getattr(self, "_proc", None)
        return proc.poll() if proc is not None else None

    def stop(self, timeout: float = 20.0) -> bool:
        pid = self.pid()
        if pid is None:
            self.pid_file.unlink(missing_ok=True)
            return False
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.running():
            proc = getattr(self, "_proc", None)
            if proc is not None:
                proc.poll()
            time.sleep(0.1)
        if self.running():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
        proc = getattr(self, "_proc", None)
        if proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(5)
        self.pid_file.unlink(missing_ok=True)
        return True

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def wait_until(self, check: Callable[[], bool], timeout: float, what: str) -> float:
        """Poll ``check`` until true; fail early with the log if the process died."""
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            if check():
                return time.monotonic() - started
            if self.exited() is not None or not self.running():
                raise StackError(
                    f"{self.name} exited while {what}; log {self.log_file}:\n" + self.log_tail()
                )
            time.sleep(0.25)
        raise StackError(
            f"{self.name} not {what} after {timeout:.0f}s; log {self.log_file}:\n" + self.log_tail()
        )
