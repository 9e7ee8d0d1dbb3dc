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

SERVICES = {
    "sampler": "sampler",
    "judge": "judge",
    "judge-reward-model": "judge",
    "trainer": "trainer",
    "trainer-cpu": "trainer",
}
PROFILES = ("cpu", "gpu", "gpu-reward-model")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return dc.compose_file()


def with_override(compose: dict[str, Any], path: str) -> dict[str, Any]:
    """``docker compose -f docker-compose.yml -f <path>``: the override's command replaces the
    service's, its environment entries are added to the service's (compose's merge rules)."""
    override = yaml.safe_load((REPO / path).read_text())
    services = {name: dict(service) for name, service in compose["services"].items()}
    for name, extra in override["services"].items():
        service = services[name]
        if "command" in extra:
            service["command"] = extra["command"]
        if "environment" in extra:
            service["environment"] = {**service.get("environment", {}), **extra["environment"]}
    return {**compose, "services": services}


@pytest.fixture(scope="module")
def lora_compose(compose: dict[str, Any]) -> dict[str, Any]:
    return with_override(compose, "deploy/compose/lora.yml")


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


def test_sampler_budget_fits_the_trainers_max_length(
    compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    from onpolicy.budget import check_sequence_budget

    services = compose["services"]
    sampler = load_service_settings("sampler", env_of(services["sampler"]), None, monkeypatch)
    for name in ("trainer", "trainer-cpu"):
        trainer = load_service_settings("trainer", env_of(services[name]), None, monkeypatch)
        check_sequence_budget(sampler.max_prompt_tokens, sampler.max_tokens, trainer.max_length)


def test_vllm_reloads_merged_weights_by_default(
    compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """handoff=merged: no LoRA (on the CPU it turns torch.compile off), dev mode for the
    in-place reload, vLLM's port not published, and sampler and trainer in merged mode."""
    services = compose["services"]
    for name in ("vllm", "vllm-cpu"):
        vllm = services[name]
        args = [dc.interpolate(a) for a in vllm["command"]]
        assert not [a for a in args if "lora" in a], args
        assert vllm["environment"]["VLLM_SERVER_DEV_MODE"] == "1"
        assert "VLLM_ALLOW_RUNTIME_LORA_UPDATING" not in vllm["environment"]
        assert "ports" not in vllm  # the dev-mode endpoints stay on the project's network
    for name, service in SERVICES.items():
        if service != "judge":
            settings = load_service_settings(service, env_of(services[name]), None, monkeypatch)
            assert settings.handoff == "merged", name


def test_vllm_serves_lora_and_the_sampler_finds_it(
    lora_compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    services = lora_compose["services"]
    for name, service in SERVICES.items():
        if service != "judge":
            settings = load_service_settings(service, env_of(services[name]), None, monkeypatch)
            assert settings.handoff == "lora", name
    for name in ("vllm", "vllm-cpu"):
        assert services[name]["environment"]["VLLM_SERVER_DEV_MODE"] == "0"
    gpu, cpu = services["vllm"], services["vllm-cpu"]
    assert gpu["profiles"] == ["gpu", "gpu-reward-model"] and cpu["profiles"] == ["cpu"]
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
    assert {"checkpoints", "datasets"} <= set(lora_compose["volumes"])


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


def active(compose: dict[str, Any], profile: str) -> dict[str, dict[str, Any]]:
    """The services ``docker compose --profile PROFILE up`` starts."""
    return {
        name: svc
        for name, svc in compose["services"].items()
        if "profiles" not in svc or profile in svc["profiles"]
    }


def gpu_ids(service: dict[str, Any]) -> list[str]:
    devices = service.get("deploy", {}).get("resources", {}).get("reservations", {})
    ids = []
    for device in devices.get("devices", []):
        assert "count" not in device, "a count takes GPUs in order: name device_ids instead"
        ids += [dc.interpolate(i) for i in device["device_ids"]]
    return ids


@pytest.mark.parametrize("profile", PROFILES)
def test_each_profile_runs_one_of_each_stage_on_its_own_gpu(
    compose: dict[str, Any], profile: str
) -> None:
    services = active(compose, profile)
    judges = [n for n in services if SERVICES.get(n) == "judge"]
    trainers = [n for n in services if SERVICES.get(n) == "trainer"]
    vllms = [n for n in services if n.startswith("vllm")]
    assert len(judges) == 1 and len(trainers) == 1 and len(vllms) == 1, sorted(services)
    ids = [i for svc in services.values() for i in gpu_ids(svc)]
    # Never two services on one GPU (vLLM takes 90 % of its memory).
    assert len(ids) == len(set(ids)), ids
    if profile == "cpu":
        assert ids == []
    # The Prometheus target and the sampler's peers find whichever judge runs as "judge".
    (judge,) = judges
    assert judge == "judge" or "judge" in services[judge]["networks"]["default"]["aliases"]


def test_reward_model_judge_gets_its_model_and_a_gpu(compose: dict[str, Any]) -> None:
    judge = compose["services"]["judge-reward-model"]
    env = env_of(judge)
    assert env["ONPOLICY_JUDGE_BACKEND"] == "reward_model"
    model = env["ONPOLICY_JUDGE_REWARD_MODEL__MODEL"]
    assert model.startswith("/models/") and env["ONPOLICY_JUDGE_REWARD_MODEL__DEVICE"] == "cuda"
    mounts = {dc.interpolate(v).split(":")[1] for v in judge["volumes"]}
    assert "/models" in mounts
    assert len(gpu_ids(judge)) == 1
    # It checks the GPU and the model before it starts, and names what is missing.
    entry = [dc.interpolate(a) for a in judge["entrypoint"]]
    assert entry[:3] == ["python", "-m", "onpolicy.preflight"]
    assert "--gpu" in entry and f"--model={model}" in entry
    assert entry[entry.index("--") + 1 :] == ["python", "-m", "onpolicy_judge"]
    trainer = [dc.interpolate(a) for a in compose["services"]["trainer"]["entrypoint"]]
    assert "--gpu" in trainer and trainer[-3:] == ["python", "-m", "onpolicy_trainer"]


def test_published_ports_are_bound_to_loopback(compose: dict[str, Any]) -> None:
    published = 0
    for name, service in compose["services"].items():
        for port in service.get("ports", []):
            assert isinstance(port, str) and port.startswith("127.0.0.1:"), (name, port)
            published += 1
    assert published >= 4  # Kafka, the judge's gRPC, Prometheus, Grafana


@pytest.mark.parametrize("given", [None, "32"])
def test_one_max_lora_rank_for_vllm_sampler_and_trainer(
    lora_compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch, given: str | None
) -> None:
    """ONPOLICY_MAX_LORA_RANK sets vLLM's --max-lora-rank and the sampler's and trainer's
    max_lora_rank together; the trainer's lora_r fits under it."""
    host = {"ONPOLICY_MAX_LORA_RANK": given} if given else {}
    services = lora_compose["services"]
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
