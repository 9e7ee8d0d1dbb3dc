"""docker-compose.yml: valid against the compose-spec JSON schema, and wired together
(topics, health checks, Prometheus targets, Grafana provisioning, the services' settings)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from _deploy import REPO, dc, load_service_settings, tools_or_fail, unknown_env

from onpolicy.settings import TOPIC_KINDS

SERVICES = {"sampler": "sampler", "judge": "judge", "trainer": "trainer", "trainer-cpu": "trainer"}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return dc.compose_file()


def env_of(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    return {k: dc.interpolate(str(v)) for k, v in env.items()}


def test_compose_validates_against_the_compose_spec(compose: dict[str, Any]) -> None:
    tools_or_fail()
    assert dc.compose_errors(compose) == []
    broken = {**compose, "services": {**compose["services"], "judge": {"imagee": "x"}}}
    assert dc.compose_errors(broken)


def test_services_build_from_their_dockerfiles(compose: dict[str, Any]) -> None:
    for name, service in SERVICES.items():
        build = compose["services"][name]["build"]
        assert build["dockerfile"] == f"services/{service}/Dockerfile"
        assert (REPO / build["context"] / build["dockerfile"]).is_file(), build["dockerfile"]
    vllm_cpu = compose["services"]["vllm-cpu"]["build"]
    assert (REPO / vllm_cpu["context"] / vllm_cpu["dockerfile"]).is_file()


def test_every_long_running_service_has_a_health_check(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        if name != "kafka-init":
            assert service["healthcheck"]["test"], name
    for name in SERVICES:
        assert "/healthz" in " ".join(compose["services"][name]["healthcheck"]["test"])


def test_topics_are_created_before_the_services_start(compose: dict[str, Any]) -> None:
    script = (REPO / "deploy" / "compose" / "create-topics.sh").read_text()
    kinds = re.search(r"for kind in ([a-z ]+);", script).group(1).split()
    assert kinds == list(TOPIC_KINDS)
    mount = compose["services"]["kafka-init"]["volumes"][0].split(":")
    assert (REPO / mount[0]).resolve() == REPO / "deploy" / "compose" / "create-topics.sh"
    for name in SERVICES:
        service = compose["services"][name]
        deps = service["depends_on"]
        assert deps["kafka-init"]["condition"] == "service_completed_successfully"
        assert env_of(service)["ONPOLICY_TOPICS__CREATE"] == "false"


def test_services_read_every_variable_they_are_given(
    compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, service in SERVICES.items():
        env = env_of(compose["services"][name])
        assert unknown_env(service, env) == [], name
        settings = load_service_settings(service, env, None, monkeypatch)
        assert settings.kafka.bootstrap_servers == "kafka:9092"
        assert settings.log.json_format is True


def test_vllm_serves_lora_and_the_sampler_finds_it(compose: dict[str, Any]) -> None:
    services = compose["services"]
    gpu, cpu = services["vllm"], services["vllm-cpu"]
    assert gpu["profiles"] == ["gpu"] and cpu["profiles"] == ["cpu"]
    assert gpu["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    assert "deploy" not in cpu
    assert "vllm" in cpu["networks"]["default"]["aliases"]
    for vllm in (gpu, cpu):
        args = [dc.interpolate(a) for a in vllm["command"]]
        assert "--enable-lora" in args and "--max-lora-rank=16" in args
        assert "--max-lora-rank=${ONPOLICY_MAX_LORA_RANK:-16}" in vllm["command"]
        assert vllm["environment"]["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"
        assert "checkpoints:/checkpoints:ro" in vllm["volumes"]
        served = next(a.split("=", 1)[1] for a in args if a.startswith("--served-model-name="))
        assert env_of(services["sampler"])["ONPOLICY_SAMPLER_SERVED_MODEL_NAME"] == served
    assert env_of(services["sampler"])["ONPOLICY_SAMPLER_VLLM_URL"] == "http://vllm:8000"
    trainer_env = env_of(services["trainer"])
    assert (
        "checkpoints:" + trainer_env["ONPOLICY_TRAINER_CHECKPOINT_URI"]
        in services["trainer"]["volumes"]
    )
    assert services["trainer"]["deploy"]["resources"]["reservations"]["devices"]
    assert "trainer" in services["trainer-cpu"]["networks"]["default"]["aliases"]
    assert {"checkpoints", "datasets"} <= set(compose["volumes"])


def test_prometheus_scrapes_every_service_and_grafana_is_provisioned(
    compose: dict[str, Any],
) -> None:
    services = compose["services"]
    prom_mount = next(v for v in services["prometheus"]["volumes"] if "prometheus.yml" in v)
    config = yaml.safe_load((REPO / prom_mount.split(":")[0]).read_text())
    targets = {
        t for job in config["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]
    }
    names = set(services) | {
        alias
        for s in services.values()
        for alias in s.get("networks", {}).get("default", {}).get("aliases", [])
    }
    for svc in ("sampler", "judge", "trainer", "vllm"):
        assert f"{svc}:8000" in targets
    assert {t.split(":")[0] for t in targets} - {"localhost"} <= names
    mounts = {v.split(":")[1]: REPO / v.split(":")[0] for v in services["grafana"]["volumes"]}
    provisioning = mounts["/etc/grafana/provisioning"]
    datasource = yaml.safe_load((provisioning / "datasources" / "prometheus.yaml").read_text())
    assert datasource["datasources"][0]["url"] == "http://prometheus:9090"
    provider = yaml.safe_load((provisioning / "dashboards" / "onpolicy.yaml").read_text())
    dashboards = Path(provider["providers"][0]["options"]["path"])
    assert mounts[str(dashboards)] == dc.DASHBOARD.parent
    home = services["grafana"]["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert mounts[str(Path(home).parent)] / Path(home).name == dc.DASHBOARD


@pytest.mark.parametrize("given", [None, "32"])
def test_one_max_lora_rank_for_vllm_sampler_and_trainer(
    compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch, given: str | None
) -> None:
    """ONPOLICY_MAX_LORA_RANK sets vLLM's --max-lora-rank and the sampler's and trainer's
    max_lora_rank together; the trainer's lora_r fits under it."""
    host = {"ONPOLICY_MAX_LORA_RANK": given} if given else {}
    services = compose["services"]
    for vllm in ("vllm", "vllm-cpu"):
        args = [dc.interpolate(a, host) for a in services[vllm]["command"]]
        [flag] = [a for a in args if a.startswith("--max-lora-rank")]
        rank = int(flag.split("=", 1)[1])
        assert rank == int(given or 16)
    for name, service in SERVICES.items():
        if service == "judge":
            continue
        env = {
            k: dc.interpolate(str(v), host)
            for k, v in services[name].get("environment", {}).items()
        }
        settings = load_service_settings(service, env, None, monkeypatch)
        assert settings.max_lora_rank == rank, name
        if service == "trainer":
            assert settings.lora_r <= rank
