"""The services started on their own, as compose or Kubernetes starts them, on this machine.

Each replica is its own process reading one config file (``ONPOLICY_CONFIG``), exactly as a
pod does; nothing coordinates them but Kafka. Tests and benchmarks use this to check that
the guarantees hold for the services themselves, any number of replicas, restarted at any
moment (``kill`` then ``start`` one of them).
"""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import yaml

from onpolicy.run.procs import ServiceProcess, wait_for
from onpolicy.settings import KafkaSettings, TopicSettings


class Deployment:
    """``samplers`` sampler replicas, ``judges`` judge replicas and one trainer."""

    def __init__(
        self,
        *,
        kafka: KafkaSettings,
        topics: TopicSettings,
        folder: Path,
        sampler: dict[str, Any],
        judge: dict[str, Any],
        trainer: dict[str, Any],
        samplers: int = 2,
        judges: int = 2,
    ):
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        config = {
            "kafka": kafka.model_dump(mode="json", exclude_none=True),
            "topics": topics.model_dump(mode="json"),
            "log": {"level": "INFO"},
            "sampler": {"group_id": f"{topics.prefix}sampler", **sampler},
            "judge": {"group_id": f"{topics.prefix}judge", "grpc": {"port": 0}, **judge},
            "trainer": {"group_id": f"{topics.prefix}trainer", **trainer},
        }
        self.config_file = folder / "config.yaml"
        self.config_file.write_text(yaml.safe_dump(config, sort_keys=False))
        self.config_file.chmod(0o600)
        env = {
            "ONPOLICY_CONFIG": str(self.config_file),
            "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
        }
        self.services: dict[str, ServiceProcess] = {
            "trainer": ServiceProcess("trainer", folder / "trainer.log", dict(env))
        }
        for i in range(samplers):
            self.services[f"sampler{i}"] = ServiceProcess(
                "sampler", folder / f"sampler{i}.log", dict(env)
            )
        for i in range(judges):
            self.services[f"judge{i}"] = ServiceProcess(
                "judge", folder / f"judge{i}.log", dict(env)
            )

    def __getitem__(self, name: str) -> ServiceProcess:
        return self.services[name]

    def start(self, ready_timeout_s: float = 300.0) -> None:
        for service in self.services.values():
            service.start()
        self.wait(lambda: all(s.ready() for s in self.services.values()), ready_timeout_s, "ready")

    def wait(self, check, timeout_s: float, what: str) -> float:
        """Poll ``check``; fail at once, with its log, if a replica died meanwhile."""
        return wait_for(check, timeout_s, what, list(self.services.values()))

    def kill(self, name: str) -> None:
        """SIGKILL one replica (no drain, no commit), as a node failure would."""
        proc = self.services[name].proc
        assert proc is not None
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)

    def restart(self, name: str) -> None:
        """Start a killed replica again now (``wait`` would also restart it, after its
        back-off, as Kubernetes restarts a crashed pod)."""
        self.services[name].start()

    def stop(self) -> dict[str, int | None]:
        return {name: s.stop() for name, s in self.services.items()}

    def log_tails(self, lines: int = 15) -> str:
        return "\n".join(f"--- {name}\n{s.log_tail(lines)}" for name, s in self.services.items())
