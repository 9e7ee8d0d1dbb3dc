"""``onpolicy run`` supervises its services like Kubernetes: real child processes, kill -9."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import pytest

from onpolicy.run.procs import RestartPolicy, ServiceDied, ServiceProcess, wait_for

# A stand-in service: answers /readyz on the port onpolicy run gives it (or exits at once).
CHILD = """
import http.server, os, sys
if os.environ.get("CHILD_EXIT"):
    print("bad settings", flush=True)
    sys.exit(int(os.environ["CHILD_EXIT"]))
port = int(os.environ["ONPOLICY_JUDGE_HTTP__PORT"])

class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *args):
        pass

print("serving", port, flush=True)
http.server.HTTPServer(("127.0.0.1", port), Handler).serve_forever()
"""


def service(tmp_path: Path, env: dict[str, str] | None = None, **policy) -> ServiceProcess:
    return ServiceProcess(
        "judge",
        tmp_path / "judge.log",
        env or {},
        policy=RestartPolicy(**({"backoff_s": 0.2, "max_backoff_s": 0.3} | policy)),
        command=[sys.executable, "-c", CHILD],
    )


def up(svc: ServiceProcess, pid: int | None = None, timeout: float = 20) -> float:
    return wait_for(
        lambda: svc.ready() and svc.proc.pid != pid, timeout, "the service ready", [svc], 0.05
    )


def test_a_killed_service_is_restarted_with_backoff_and_each_restart_is_recorded(tmp_path):
    svc = service(tmp_path, max_restarts=3)
    svc.start()
    try:
        up(svc)
        time.sleep(0.3)
        first = svc.proc.pid
        os.kill(first, signal.SIGKILL)
        up(svc, first)
        second = svc.proc.pid
        os.kill(second, signal.SIGKILL)
        up(svc, second)
        assert svc.alive() and svc.proc.pid not in (first, second)
    finally:
        assert svc.stop(10) == -signal.SIGTERM  # the stand-in does not handle SIGTERM
    assert [(r.service, r.exit_code, r.restart) for r in svc.restarts] == [
        ("judge", -9, 1),
        ("judge", -9, 2),
    ]
    # Quick crashes double the back-off, up to max_backoff_s.
    assert [r.backoff_s for r in svc.restarts] == [0.2, 0.3]
    assert svc.restarts[0].uptime_s >= 0.3
    assert svc.restarts[0].exited_at.endswith("+00:00")
    text = (tmp_path / "judge.log").read_text()
    assert text.count("serving") == 3
    assert "--- onpolicy run: judge exited with -9" in text
    assert oct((tmp_path / "judge.log").stat().st_mode & 0o777) == "0o600"


def test_a_service_that_keeps_crashing_ends_the_run_with_a_clear_error(tmp_path):
    svc = service(tmp_path, max_restarts=2)
    svc.start()
    try:
        up(svc)
        for _ in range(2):
            pid = svc.proc.pid
            os.kill(pid, signal.SIGKILL)
            up(svc, pid)
        os.kill(svc.proc.pid, signal.SIGKILL)
        with pytest.raises(ServiceDied) as info:
            wait_for(lambda: False, 20, "round 1 scores", [svc], 0.05)
    finally:
        svc.stop(10)
    said = str(info.value)
    assert "judge exited with -9" in said
    assert "restarted 2 times already (max_restarts 2; exit codes [-9, -9, -9])" in said
    assert "serving" in said  # the log's last lines
    assert len(svc.restarts) == 2


def test_invalid_settings_are_not_restarted(tmp_path):
    svc = service(tmp_path, env={"CHILD_EXIT": "2"})
    svc.start()
    started = time.monotonic()
    with pytest.raises(
        ServiceDied, match=r"judge exited with 2 \(invalid settings\): not restarted"
    ):
        wait_for(lambda: False, 20, "services ready", [svc], 0.05)
    assert time.monotonic() - started < 10 and svc.restarts == []
    svc.stop(10)


def test_a_stopped_service_is_not_restarted(tmp_path):
    svc = service(tmp_path)
    svc.start()
    up(svc)
    svc.stop(10)
    svc.supervise()
    time.sleep(0.4)
    svc.supervise()
    assert not svc.alive() and svc.restarts == []


def test_waits_ride_out_a_restart_of_the_service_they_ask(tmp_path):
    svc = service(tmp_path, backoff_s=0.5)
    svc.start()
    try:
        up(svc)
        os.kill(svc.proc.pid, signal.SIGKILL)
        # The check talks to the service: refused connections while it is down count as
        # "not yet", not as a failed run.
        took = wait_for(lambda: svc.get("/readyz", timeout=1).status_code == 200, 20, "x", [svc])
        assert took > 0.4 and len(svc.restarts) == 1
    finally:
        svc.stop(10)
