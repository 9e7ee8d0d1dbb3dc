"""Kubernetes manifests: every overlay builds with Kustomize, every object validates against
the Kubernetes JSON schemas or its CRD's schema, and the pieces fit together (selectors,
ports, topics, KEDA triggers, settings the services really read)."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from _deploy import built, dc, load_service_settings, tools_or_fail, unknown_env

from onpolicy.settings import TOPIC_KINDS

# examples/multinode: the gpu overlay with the trainer over several nodes (FSDP, c10d).
OVERLAYS = ("base", "dev", "gpu", "gke", "eks", "gpu-operator", "examples/multinode")
# The cloud overlays: the gpu overlay with components/<cloud> (GPU labels, RWX storage class).
CLOUDS = {
    "gke": ("cloud.google.com/gke-accelerator", "standard-rwx"),
    "eks": ("node.kubernetes.io/instance-type", "onpolicy-efs"),
    "gpu-operator": ("nvidia.com/gpu.product", "nfs-client"),
}
GPU_OVERLAYS = ("gpu", *CLOUDS)
# handoff=lora: deploy/k8s/examples/<name>, an overlay with components/lora-handoff (the
# overlays themselves reload merged weights).
LORA_OVERLAYS = ("dev-lora",)


def built_lora(name: str) -> tuple[dict[str, Any], ...]:
    return tuple(dc.kustomize_build(dc.K8S / "examples" / name))


NAMESPACE = "onpolicy"
# Kinds the overlays may hold that live outside namespaces.
CLUSTER_SCOPED = {"Namespace", "StorageClass", "PersistentVolume", "ClusterRole",
                  "ClusterRoleBinding", "CustomResourceDefinition", "PriorityClass"}  # fmt: skip
SERVICES = ("sampler", "judge", "trainer")


@pytest.fixture(scope="module", autouse=True)
def _tools() -> None:
    tools_or_fail()


def of_kind(objects, kind: str) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind]


def named(objects, kind: str, name: str) -> dict[str, Any]:
    matches = [o for o in of_kind(objects, kind) if o["metadata"]["name"] == name]
    assert len(matches) == 1, f"expected one {kind}/{name}, found {len(matches)}"
    return matches[0]


def pod_spec(objects, deployment: str) -> dict[str, Any]:
    return named(objects, "Deployment", deployment)["spec"]["template"]["spec"]


def container(objects, deployment: str, name: str) -> dict[str, Any]:
    return next(c for c in pod_spec(objects, deployment)["containers"] if c["name"] == name)


def env_of(objects, c: dict[str, Any]) -> dict[str, str]:
    """A container's environment with ConfigMap references resolved from the build."""
    env = {}
    for ref in c.get("envFrom", []):
        env.update(named(objects, "ConfigMap", ref["configMapRef"]["name"])["data"])
    for var in c.get("env", []):
        if "value" in var:
            env[var["name"]] = var["value"]
        elif "configMapKeyRef" in var.get("valueFrom", {}):
            ref = var["valueFrom"]["configMapKeyRef"]
            env[var["name"]] = named(objects, "ConfigMap", ref["name"])["data"][ref["key"]]
    return env


def config_map_named(objects, prefix: str) -> dict[str, Any]:
    # Generated ConfigMaps carry a content hash suffix.
    found = [o for o in of_kind(objects, "ConfigMap") if o["metadata"]["name"].startswith(prefix)]
    assert len(found) == 1, prefix
    return found[0]


def shared_config(objects) -> dict[str, Any]:
    return yaml.safe_load(config_map_named(objects, "onpolicy-config-")["data"]["config.yaml"])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_object_validates_against_its_schema(overlay: str) -> None:
    objects = built(overlay)
    kinds = {o["kind"] for o in objects}
    assert {
        "Namespace", "Deployment", "Service", "ConfigMap", "Job", "PersistentVolumeClaim",
        "PodDisruptionBudget", "NetworkPolicy", "Kafka", "KafkaNodePool", "KafkaTopic",
        "ScaledObject", "ServiceMonitor",
    } <= kinds  # fmt: skip
    errors = [e for obj in objects for e in dc.validate_object(obj)]
    assert errors == []


def test_schema_validation_rejects_unknown_and_mistyped_fields() -> None:
    # The check is only worth something if it fails on a typo: one per schema source.
    objects = built("gpu")
    for kind in ("Deployment", "KafkaTopic", "ScaledObject", "ServiceMonitor", "Kafka"):
        obj = json.loads(json.dumps(of_kind(objects, kind)[0]))
        obj["spec"]["replicaz"] = 1
        assert any("replicaz" in e for e in dc.validate_object(obj)), kind
    topic = json.loads(json.dumps(of_kind(objects, "KafkaTopic")[0]))
    topic["spec"]["partitions"] = "six"
    assert dc.validate_object(topic)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pods_are_hardened_probed_and_sized(overlay: str) -> None:
    objects = built(overlay)
    for deployment in of_kind(objects, "Deployment"):
        spec = deployment["spec"]["template"]["spec"]
        name = deployment["metadata"]["name"]
        assert spec["securityContext"]["runAsNonRoot"] is True, name
        assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault", name
        for c in spec["containers"]:
            where = f"{name}/{c['name']}"
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False, where
            assert sc["readOnlyRootFilesystem"] is True, where
            assert sc["capabilities"]["drop"] == ["ALL"], where
            assert {"cpu", "memory"} <= set(c["resources"]["requests"]), where
            assert "memory" in c["resources"]["limits"], where
            health = "/health" if c["name"] == "vllm" else "/healthz"
            ready = "/health" if c["name"] == "vllm" else "/readyz"
            assert c["livenessProbe"]["httpGet"]["path"] == health, where
            assert c["readinessProbe"]["httpGet"]["path"] == ready, where
            ports = {p["name"] for p in c["ports"]}
            for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
                if probe in c:
                    assert c[probe]["httpGet"]["port"] in ports, where
            # A read-only root needs a writable /tmp.
            assert "/tmp" in {m["mountPath"] for m in c["volumeMounts"]}, where


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_services_and_service_monitors_reach_named_ports(overlay: str) -> None:
    objects = built(overlay)
    deployments = of_kind(objects, "Deployment")
    for svc in of_kind(objects, "Service"):
        pods = [
            d
            for d in deployments
            if svc["spec"]["selector"].items()
            <= d["spec"]["template"]["metadata"]["labels"].items()
        ]
        assert len(pods) == 1, svc["metadata"]["name"]
        container_ports = {
            p["name"] for c in pods[0]["spec"]["template"]["spec"]["containers"] for p in c["ports"]
        }
        assert {p["targetPort"] for p in svc["spec"]["ports"]} <= container_ports
    monitors = of_kind(objects, "ServiceMonitor")
    assert {m["metadata"]["name"] for m in monitors} == set(SERVICES)
    for monitor in monitors:
        # kube-prometheus-stack's Prometheus selects ServiceMonitors by its release label.
        assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
        selector = monitor["spec"]["selector"]["matchLabels"]
        targets = [
            s for s in of_kind(objects, "Service")
            if selector.items() <= s["metadata"]["labels"].items()
        ]  # fmt: skip
        assert len(targets) == 1, monitor["metadata"]["name"]
        ports = {p["name"] for p in targets[0]["spec"]["ports"]}
        assert {e["port"] for e in monitor["spec"]["endpoints"]} <= ports
        assert all(e["path"] == "/metrics" for e in monitor["spec"]["endpoints"])
    # vLLM's own metrics are scraped too.
    sampler = next(m for m in monitors if m["metadata"]["name"] == "sampler")
    assert {e["port"] for e in sampler["spec"]["endpoints"]} == {"http", "vllm"}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_a_kafka_topic_per_pipeline_topic(overlay: str) -> None:
    objects = built(overlay)
    prefix = shared_config(objects)["topics"]["prefix"]
    kafka = of_kind(objects, "Kafka")
    assert len(kafka) == 1
    cluster = kafka[0]["metadata"]["name"]
    brokers = sum(
        p["spec"]["replicas"]
        for p in of_kind(objects, "KafkaNodePool")
        if "broker" in p["spec"]["roles"]
    )
    topics = {t["spec"]["topicName"]: t for t in of_kind(objects, "KafkaTopic")}
    assert set(topics) == {prefix + kind for kind in TOPIC_KINDS}
    for topic in topics.values():
        assert topic["metadata"]["labels"]["strimzi.io/cluster"] == cluster
        assert topic["spec"]["replicas"] <= brokers
        assert topic["spec"]["config"]["max.message.bytes"] == 8388608
    assert topics[prefix + "policy"]["spec"]["partitions"] == 1
    assert topics[prefix + "policy"]["spec"]["config"]["retention.ms"] == -1
    assert topics[prefix + "dlq"]["spec"]["config"]["retention.ms"] == -1
    # Strimzi owns the topics; the services must not race it.
    assert shared_config(objects)["topics"]["create"] is False


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_keda_scales_the_sampler_on_round_work_and_the_judge_on_its_lag(overlay: str) -> None:
    objects = built(overlay)
    prefix = shared_config(objects)["topics"]["prefix"]
    partitions = {
        t["spec"]["topicName"]: t["spec"]["partitions"] for t in of_kind(objects, "KafkaTopic")
    }
    cluster = of_kind(objects, "Kafka")[0]["metadata"]["name"]
    namespace = named(objects, "Deployment", "sampler")["metadata"]["namespace"]
    expected = {"sampler": "prompts", "judge": "completions"}
    scaled = {s["metadata"]["name"]: s for s in of_kind(objects, "ScaledObject")}
    assert set(scaled) == set(expected)
    for name, kind in expected.items():
        spec = scaled[name]["spec"]
        named(objects, "Deployment", spec["scaleTargetRef"]["name"])
        (trigger,) = spec["triggers"]
        meta = trigger["metadata"]
        if name == "sampler":
            # The round protocol's own measure of sampler work, not the prompt backlog.
            assert trigger["type"] == "prometheus"
            assert "onpolicy_trainer_round_prompts_remaining" in meta["query"]
            assert f'namespace="{namespace}"' in meta["query"]
            assert meta["serverAddress"].startswith("http://") and float(meta["threshold"]) > 0
        else:
            assert trigger["type"] == "kafka"
            assert meta["consumerGroup"] == name
            assert meta["topic"] == prefix + kind
            (inside,) = [
                lst
                for lst in of_kind(objects, "Kafka")[0]["spec"]["kafka"]["listeners"]
                if lst["type"] == "internal"
            ]
            assert meta["bootstrapServers"] == (
                f"{cluster}-kafka-bootstrap.{namespace}.svc:{inside['port']}"
            )
            if "authentication" in inside:  # KEDA logs in as the services do (gpu overlays)
                assert (meta["sasl"], meta["tls"]) == ("scram_sha512", "enable")
                auth = named(objects, "TriggerAuthentication", trigger["authenticationRef"]["name"])
                assert {p["parameter"] for p in auth["spec"]["env"]} == {"username", "password"}
            assert int(meta["lagThreshold"]) > 0
        # More consumers than partitions would idle.
        assert spec["minReplicaCount"] >= 1
        assert spec["maxReplicaCount"] <= partitions[prefix + kind]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_services_read_every_variable_they_are_given(
    overlay: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    objects = built(overlay)
    config = tmp_path / "config.yaml"
    config.write_text(config_map_named(objects, "onpolicy-config-")["data"]["config.yaml"])
    for service in SERVICES:
        c = container(objects, service, service)
        env = env_of(objects, c)
        assert env["ONPOLICY_CONFIG"] == "/etc/onpolicy/config.yaml"
        assert unknown_env(service, env) == [], service
        settings = load_service_settings(service, env, config, monkeypatch)
        assert settings.kafka.bootstrap_servers.startswith(
            of_kind(objects, "Kafka")[0]["metadata"]["name"] + "-kafka-bootstrap:"
        )
        assert settings.topics.create is False
        assert settings.log.json_format is True
        port = next(p["containerPort"] for p in c["ports"] if p["name"] == "http")
        assert settings.http.port == port
        mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
        assert mounts["config"] == "/etc/onpolicy"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_sampler_budget_fits_the_trainers_max_length(
    overlay: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every pair the deployed sampler can produce fits the deployed trainer (never cut)."""
    from onpolicy.budget import check_sequence_budget

    objects = built(overlay)
    config = tmp_path / "config.yaml"
    config.write_text(config_map_named(objects, "onpolicy-config-")["data"]["config.yaml"])
    loaded = {
        service: load_service_settings(
            service, env_of(objects, container(objects, service, service)), config, monkeypatch
        )
        for service in ("sampler", "trainer")
    }
    sampler, trainer = loaded["sampler"], loaded["trainer"]
    check_sequence_budget(sampler.max_prompt_tokens, sampler.max_tokens, trainer.max_length)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_sampler_pod_reloads_merged_weights_by_default(
    overlay: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """handoff=merged: vLLM without LoRA, in dev mode; sampler and trainer in merged mode;
    vLLM's port (and so its dev-mode endpoints) admitted from outside the pod only to
    Prometheus' pods."""
    objects = built(overlay)
    config = tmp_path / "config.yaml"
    config.write_text(config_map_named(objects, "onpolicy-config-")["data"]["config.yaml"])
    vllm = container(objects, "sampler", "vllm")
    assert not [a for a in vllm["args"] if "lora" in a]
    vllm_env = env_of(objects, vllm)
    assert vllm_env["VLLM_SERVER_DEV_MODE"] == "1"
    assert "VLLM_ALLOW_RUNTIME_LORA_UPDATING" not in vllm_env
    for deployment in ("sampler", "trainer"):
        env = env_of(objects, container(objects, deployment, deployment))
        settings = load_service_settings(deployment, env, config, monkeypatch)
        assert settings.handoff == "merged", deployment
    policies = {p["metadata"]["name"]: p["spec"] for p in of_kind(objects, "NetworkPolicy")}
    [scrape] = policies["allow-metrics-scrape"]["ingress"]
    [peer] = scrape["from"]
    assert peer["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "prometheus"}


@pytest.mark.parametrize("overlay", LORA_OVERLAYS)
def test_sampler_pod_serves_lora_policies_from_the_trainers_checkpoints(
    overlay: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    objects = built_lora(overlay)
    config = tmp_path / "config.yaml"
    config.write_text(config_map_named(objects, "onpolicy-config-")["data"]["config.yaml"])
    pod = pod_spec(objects, "sampler")
    vllm, sampler = container(objects, "sampler", "vllm"), container(objects, "sampler", "sampler")
    args = vllm["args"]
    assert "--enable-lora" in args and "--max-lora-rank=$(MAX_LORA_RANK)" in args
    assert env_of(objects, vllm)["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"
    assert env_of(objects, vllm)["VLLM_SERVER_DEV_MODE"] == "0"
    sampler_env = env_of(objects, sampler)
    vllm_port = next(p["containerPort"] for p in vllm["ports"] if p["name"] == "vllm")
    assert sampler_env["ONPOLICY_SAMPLER_VLLM_URL"] == f"http://localhost:{vllm_port}"
    assert f"--port={vllm_port}" in args
    # The sampler asks for the model under the name vLLM serves it.
    served = env_of(objects, vllm)["SERVED_MODEL_NAME"]
    assert "--served-model-name=$(SERVED_MODEL_NAME)" in args
    assert sampler_env["ONPOLICY_SAMPLER_SERVED_MODEL_NAME"] == served
    settings = load_service_settings("sampler", sampler_env, config, monkeypatch)
    assert settings.handoff == "lora"
    max_loras = next(int(a.split("=")[1]) for a in args if a.startswith("--max-loras="))
    assert max_loras >= settings.keep_adapters
    # A memory-backed /dev/shm for vLLM.
    volumes = {v["name"]: v for v in pod["volumes"]}
    shm = next(m for m in vllm["volumeMounts"] if m["mountPath"] == "/dev/shm")
    assert volumes[shm["name"]]["emptyDir"]["medium"] == "Memory"
    # The trainer writes adapters where both sampler containers read them, read-only.
    trainer = container(objects, "trainer", "trainer")
    ckpt_path = env_of(objects, trainer)["ONPOLICY_TRAINER_CHECKPOINT_URI"]
    trainer_mount = next(m for m in trainer["volumeMounts"] if m["mountPath"] == ckpt_path)
    claim = {v["name"]: v for v in pod_spec(objects, "trainer")["volumes"]}[trainer_mount["name"]][
        "persistentVolumeClaim"
    ]["claimName"]
    for c in (vllm, sampler):
        mount = next(m for m in c["volumeMounts"] if m["mountPath"] == ckpt_path)
        assert mount["readOnly"] is True
        assert volumes[mount["name"]]["persistentVolumeClaim"]["claimName"] == claim
    # Remote adapters are fetched to the sampler's /tmp, which vLLM must see too.
    tmp = {m["mountPath"]: m["name"] for m in vllm["volumeMounts"]}["/tmp"]
    assert {m["mountPath"]: m["name"] for m in sampler["volumeMounts"]}["/tmp"] == tmp
    assert str(settings.adapter_cache_dir).startswith("/tmp/")
    # The model cache is shared by vLLM and the trainer.
    model = {m["mountPath"]: m["name"] for m in vllm["volumeMounts"]}["/models"]
    assert volumes[model]["persistentVolumeClaim"]["claimName"] == "onpolicy-model-cache"


def gpus(c: dict[str, Any]) -> int:
    return int(c["resources"].get("limits", {}).get("nvidia.com/gpu", 0))


def tolerates_gpu_taint(spec: dict[str, Any]) -> bool:
    return any(t.get("key") == "nvidia.com/gpu" for t in spec.get("tolerations", []))


@pytest.mark.parametrize("overlay", GPU_OVERLAYS)
def test_gpu_overlays_schedule_gpu_pods_on_gpu_nodes(overlay: str) -> None:
    objects = built(overlay)
    for deployment in ("sampler", "trainer", "judge"):
        spec = pod_spec(objects, deployment)
        # Any nvidia.com/gpu taint: GKE's =present, EKS's =true, or none (GPU Operator).
        assert tolerates_gpu_taint(spec), deployment
        assert all(t["operator"] == "Exists" for t in spec["tolerations"]), deployment
    assert gpus(container(objects, "sampler", "vllm")) == 1
    assert gpus(container(objects, "sampler", "sampler")) == 0  # the worker only speaks HTTP
    assert gpus(container(objects, "trainer", "trainer")) == 1
    assert gpus(container(objects, "judge", "judge")) == 1
    judge_env = env_of(objects, container(objects, "judge", "judge"))
    assert judge_env["ONPOLICY_JUDGE_BACKEND"] == "reward_model"
    assert judge_env["ONPOLICY_JUDGE_REWARD_MODEL__MODEL"]
    selectors = {d: pod_spec(objects, d).get("nodeSelector", {}) for d in SERVICES}
    if overlay == "gpu":
        # Cloud-neutral: the GPU requests alone keep the pods on GPU nodes.
        assert selectors == {d: {} for d in SERVICES}
    else:
        label, _ = CLOUDS[overlay]
        assert label in selectors["sampler"] and label in selectors["trainer"]
        assert selectors["sampler"] == selectors["trainer"]
    # Labels only NVIDIA's GPU Feature Discovery sets appear in the GPU Operator overlay only.
    text = json.dumps([pod_spec(objects, d) for d in SERVICES])
    assert ("nvidia.com/gpu.product" in text) == (overlay == "gpu-operator")
    assert ("nvidia.com/gpu.present" in text) == (overlay == "gpu-operator")
    # Replicated Kafka and an authenticated TLS listener for outside publishers.
    assert sum(p["spec"]["replicas"] for p in of_kind(objects, "KafkaNodePool")) == 3
    external = [
        listener
        for listener in of_kind(objects, "Kafka")[0]["spec"]["kafka"]["listeners"]
        if listener["type"] in ("loadbalancer", "nodeport", "ingress", "route")
    ]
    assert external and all(
        lst["tls"] and lst["authentication"]["type"] == "scram-sha-512" for lst in external
    )
    assert named(objects, "KafkaUser", "prompt-publisher")["spec"]["authentication"]["type"] == (
        "scram-sha-512"
    )


def test_dev_overlay_needs_no_gpu() -> None:
    objects = built("dev")
    text = json.dumps([o for o in objects if o["kind"] == "Deployment"])
    assert "nvidia.com/gpu" not in text
    for deployment in of_kind(objects, "Deployment"):
        assert not tolerates_gpu_taint(deployment["spec"]["template"]["spec"])
    vllm = container(objects, "sampler", "vllm")
    assert vllm["image"].startswith("onpolicy/vllm-cpu:")
    assert not any(a.startswith("--gpu-memory-utilization") for a in vllm["args"])
    for pvc in of_kind(objects, "PersistentVolumeClaim"):
        assert pvc["spec"]["accessModes"] == ["ReadWriteOnce"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_network_policies_deny_by_default_and_admit_scrapes(overlay: str) -> None:
    objects = built(overlay)
    policies = {p["metadata"]["name"]: p["spec"] for p in of_kind(objects, "NetworkPolicy")}
    deny = policies["default-deny-ingress"]
    assert (
        deny["podSelector"] == {} and deny["policyTypes"] == ["Ingress"] and "ingress" not in deny
    )
    scrape_ports = {p["port"] for p in policies["allow-metrics-scrape"]["ingress"][0]["ports"]}
    for c in container(objects, "sampler", "vllm"), container(objects, "sampler", "sampler"):
        assert {p["containerPort"] for p in c["ports"]} <= scrape_ports
    # Every pipeline pod (the sampler's, the judge's, the trainer's) is a Kafka client that
    # Strimzi's listener policy must admit, and KEDA must read the lag.
    peers = of_kind(objects, "Kafka")[0]["spec"]["kafka"]["listeners"][0]["networkPolicyPeers"]
    selectors = [p.get("podSelector", {}).get("matchLabels", {}) for p in peers]
    for deployment in of_kind(objects, "Deployment"):
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert any(s and s.items() <= labels.items() for s in selectors)
    assert any(
        p.get("namespaceSelector", {}).get("matchLabels", {}).get("kubernetes.io/metadata.name")
        == "keda"
        for p in peers
    )


def test_dashboard_config_map_is_the_dashboard_file() -> None:
    objects = built("base")
    cm = named(objects, "ConfigMap", "onpolicy-grafana-dashboard")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(cm["data"]["onpolicy.json"]) == json.loads(dc.DASHBOARD.read_text())


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_object_names_are_valid_and_unique(overlay: str) -> None:
    objects = built(overlay)
    keys = [(o["kind"], o["metadata"].get("namespace"), o["metadata"]["name"]) for o in objects]
    assert len(keys) == len(set(keys))
    for _, _, name in keys:
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?", name) and len(name) <= 63, name


def pod_templates(objects) -> list[tuple[str, dict[str, Any]]]:
    return [
        (f"{o['kind']}/{o['metadata']['name']}", o["spec"]["template"]["spec"])
        for o in objects
        if o["kind"] in ("Deployment", "Job")
    ]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_namespaced_object_is_in_the_namespace(overlay: str) -> None:
    # An object without one lands in kubectl's current namespace (KafkaUser once did).
    objects = built(overlay)
    outside = [
        f"{o['kind']}/{o['metadata']['name']}: {o['metadata'].get('namespace')}"
        for o in objects
        if o["kind"] not in CLUSTER_SCOPED and o["metadata"].get("namespace") != NAMESPACE
    ]
    assert outside == []
    assert {o["metadata"]["name"] for o in of_kind(objects, "Namespace")} == {NAMESPACE}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_no_secret_data_and_no_replicas_under_keda(overlay: str) -> None:
    objects = built(overlay)
    # The token Secret is created beside the kustomization: an apply must never overwrite it.
    assert of_kind(objects, "Secret") == []
    assert "secretGenerator" not in (dc.K8S / "base" / "kustomization.yaml").read_text()
    for scaled in of_kind(objects, "ScaledObject"):
        target = named(objects, "Deployment", scaled["spec"]["scaleTargetRef"]["name"])
        # A replicas field would scale KEDA's choice back at every apply.
        assert "replicas" not in target["spec"], target["metadata"]["name"]
    assert named(objects, "Deployment", "trainer")["spec"]["replicas"] == 1


def _config_key(objects, c: dict[str, Any], var: str) -> str | None:
    for item in c.get("env", []):
        if item["name"] == var:
            ref = item.get("valueFrom", {}).get("configMapKeyRef")
            return ref["key"] if ref else None
    return None


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_model_a_pod_loads_is_fetched_by_the_job_and_awaited(overlay: str) -> None:
    objects = built(overlay)
    job = named(objects, "Job", "onpolicy-models")["spec"]["template"]["spec"]
    (fetch,) = job["containers"]
    assert fetch["command"][:4] == ["python", "-m", "onpolicy.preflight", "--fetch"]
    fetched = {a.removeprefix("--model=$(").removesuffix(")") for a in fetch["command"][4:]}
    assert {_config_key(objects, fetch, v) for v in fetched} == fetched == {"MODEL", "REWARD_MODEL"}
    assert env_of(objects, fetch)["HF_HUB_OFFLINE"] == "0"
    mounts = {m["name"]: m["mountPath"] for m in fetch["volumeMounts"]}
    assert mounts["hf-token"] == "/var/run/secrets/onpolicy/hf"
    token = next(v for v in job["volumes"] if v["name"] == "hf-token")["secret"]
    assert token["secretName"] == "onpolicy-hf-token" and token["optional"] is True
    # Where each pod's model comes from: (deployment, container, variable naming the model).
    loads = [("sampler", "vllm", "MODEL"), ("trainer", "trainer", "ONPOLICY_TRAINER_MODEL")]
    judge_env = env_of(objects, container(objects, "judge", "judge"))
    if judge_env["ONPOLICY_JUDGE_BACKEND"] == "reward_model":
        loads.append(("judge", "judge", "ONPOLICY_JUDGE_REWARD_MODEL__MODEL"))
    for deployment, name, var in loads:
        c = container(objects, deployment, name)
        key = _config_key(objects, c, var) or var  # vLLM reads MODEL through envFrom
        assert key in fetched, (deployment, key)
        (init,) = [
            i for i in pod_spec(objects, deployment)["initContainers"] if i["name"] == "models"
        ]
        assert init["command"][:3] == ["python", "-m", "onpolicy.preflight"]
        assert any(a.startswith("--wait=") for a in init["command"])
        model_args = [a for a in init["command"] if a.startswith("--model=$(")]
        assert [_config_key(objects, init, a[len("--model=$(") : -1]) for a in model_args] == [key]
        # The same cache as the container that loads it, read-only.
        mount = next(m for m in init["volumeMounts"] if m["mountPath"] == "/models")
        assert mount["readOnly"] is True and mount["name"] == "model-cache"
        assert env_of(objects, init)["HF_HOME"] == env_of(objects, c)["HF_HOME"]
    # vLLM never downloads (the trainer and judge images set HF_HUB_OFFLINE=1 themselves).
    assert env_of(objects, container(objects, "sampler", "vllm"))["HF_HUB_OFFLINE"] == "1"
    for service in ("judge", "trainer"):
        dockerfile = (dc.REPO / "services" / service / "Dockerfile").read_text()
        assert "HF_HUB_OFFLINE=1" in dockerfile


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_gpu_containers_check_their_gpu_at_start(overlay: str) -> None:
    objects = built(overlay)
    for deployment in SERVICES:
        for c in pod_spec(objects, deployment)["containers"]:
            if c["name"] == "vllm":
                continue  # vLLM's GPU build fails without a GPU by itself
            command = c.get("command", [])
            checks = command[:3] == ["python", "-m", "onpolicy.preflight"] and "--gpu" in command
            assert checks == (gpus(c) > 0), (deployment, c["name"], command)
            if checks:
                assert command[command.index("--") + 1 :] == [
                    "python",
                    "-m",
                    f"onpolicy_{c['name']}",
                ]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pod_templates_and_init_steps_are_hardened(overlay: str) -> None:
    objects = built(overlay)
    for where, spec in pod_templates(objects):
        assert spec["securityContext"]["runAsNonRoot"] is True, where
        assert spec["securityContext"]["runAsUser"] == 10001, where
        for c in spec.get("initContainers", []) + spec["containers"]:
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False, (where, c["name"])
            assert sc["readOnlyRootFilesystem"] is True, (where, c["name"])
            assert sc["capabilities"]["drop"] == ["ALL"], (where, c["name"])
            assert {"cpu", "memory"} <= set(c["resources"]["requests"]), (where, c["name"])
            root = sc.get("runAsUser") == 0
            # Root only for the volume-owner step, and with chown rights only.
            assert root == (c["name"] == "volume-owner"), (where, c["name"])
            if root:
                assert set(sc["capabilities"]["add"]) <= {"CHOWN", "FOWNER", "DAC_OVERRIDE"}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_shared_volumes_are_given_to_uid_10001_before_any_pod_writes(overlay: str) -> None:
    objects = built(overlay)
    job = named(objects, "Job", "onpolicy-models")["spec"]["template"]["spec"]
    (owner,) = [c for c in job["initContainers"] if c["name"] == "volume-owner"]
    claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in job["volumes"]
              if "persistentVolumeClaim" in v}  # fmt: skip
    mounted = {claims[m["name"]]: m["mountPath"] for m in owner["volumeMounts"]}
    assert set(mounted) == {
        p["metadata"]["name"] for p in of_kind(objects, "PersistentVolumeClaim")
    }
    script = owner["command"][-1]
    for path in mounted.values():
        assert path in script
    assert "chown 10001:10001" in script


@pytest.mark.parametrize("overlay", list(CLOUDS))
def test_cloud_overlays_name_a_read_write_many_class(overlay: str) -> None:
    objects = built(overlay)
    _, storage_class = CLOUDS[overlay]
    for pvc in of_kind(objects, "PersistentVolumeClaim"):
        assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
        assert pvc["spec"]["storageClassName"] == storage_class
    classes = of_kind(objects, "StorageClass")
    if overlay == "eks":
        (efs,) = classes
        assert efs["provisioner"] == "efs.csi.aws.com"
        # EFS access points own each volume as the pods' user (fsGroup is ignored on NFS).
        assert efs["parameters"]["uid"] == efs["parameters"]["gid"] == "10001"
    else:
        assert classes == []  # the cloud's own class (GKE) or the cluster's (NFS provisioner)


@pytest.mark.parametrize("overlay", GPU_OVERLAYS)
def test_kafka_spreads_over_nodes_and_zones_and_the_external_listener_is_restricted(
    overlay: str,
) -> None:
    objects = built(overlay)
    kafka = of_kind(objects, "Kafka")[0]
    cluster = kafka["metadata"]["name"]
    assert kafka["spec"]["kafka"]["rack"]["topologyKey"] == "topology.kubernetes.io/zone"
    for pool in of_kind(objects, "KafkaNodePool"):
        pod = pool["spec"]["template"]["pod"]
        labels = {"strimzi.io/cluster": cluster, "strimzi.io/pool-name": pool["metadata"]["name"]}
        (anti,) = pod["affinity"]["podAntiAffinity"][
            "requiredDuringSchedulingIgnoredDuringExecution"
        ]
        assert anti["topologyKey"] == "kubernetes.io/hostname"
        assert anti["labelSelector"]["matchLabels"] == labels
        (spread,) = pod["topologySpreadConstraints"]
        assert spread["topologyKey"] == "topology.kubernetes.io/zone"
        assert spread["labelSelector"]["matchLabels"] == labels and spread["maxSkew"] == 1
    for listener in kafka["spec"]["kafka"]["listeners"]:
        if listener["type"] in ("loadbalancer", "nodeport"):
            ranges = listener["configuration"]["loadBalancerSourceRanges"]
            assert ranges and not {"0.0.0.0/0", "::/0"} & set(ranges)


def test_the_control_plane_check_covers_every_overlay_meant_for_a_cluster() -> None:
    # make deploy-check (deploy/tools/deploy_check.py) applies these to a real API server.
    import importlib.util

    spec = importlib.util.spec_from_file_location("deploy_check", dc.TOOLS_DIR / "deploy_check.py")
    check = importlib.util.module_from_spec(spec)
    sys.modules["deploy_check"] = check  # dataclasses look their module up
    spec.loader.exec_module(check)
    overlays = {p.name for p in (dc.K8S / "overlays").iterdir() if p.is_dir()}
    cases = {c.overlay: c for c in check.cases()}
    # gpu is the cloud-neutral layer under gke, eks and gpu-operator.
    assert set(cases) == overlays - {"gpu"}
    for case in cases.values():
        assert set(case.placement) == set(check.PIPELINE)
        pools = {n.pool for n in case.nodes}
        assert set().union(*case.placement.values()) <= pools
        # A static volume of the claim's access mode for every claim.
        claims = of_kind(built(case.overlay), "PersistentVolumeClaim")
        modes = [v.access for v in case.volumes]
        assert sorted(c["spec"]["accessModes"][0] for c in claims) == sorted(modes)


@pytest.mark.parametrize("overlay", LORA_OVERLAYS)
def test_one_max_lora_rank_for_vllm_sampler_and_trainer(
    overlay: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """vLLM's --max-lora-rank, the sampler's and the trainer's max_lora_rank are one key, and
    the trainer's lora_r fits under it (else every sampler would refuse its adapters)."""
    objects = built_lora(overlay)
    config = tmp_path / "config.yaml"
    config.write_text(config_map_named(objects, "onpolicy-config-")["data"]["config.yaml"])
    vllm = container(objects, "sampler", "vllm")
    flags = [a for a in vllm["args"] if a.startswith("--max-lora-rank")]
    assert flags == ["--max-lora-rank=$(MAX_LORA_RANK)"]
    rank = int(env_of(objects, vllm)["MAX_LORA_RANK"])
    sampler = load_service_settings(
        "sampler", env_of(objects, container(objects, "sampler", "sampler")), config, monkeypatch
    )
    trainer = load_service_settings(
        "trainer", env_of(objects, container(objects, "trainer", "trainer")), config, monkeypatch
    )
    assert sampler.max_lora_rank == trainer.max_lora_rank == rank
    assert trainer.full_finetune or trainer.lora_r <= rank
    # Both read it from the ConfigMap, not from a copy of the number.
    for deployment in ("sampler", "trainer"):
        var = next(
            v
            for v in container(objects, deployment, deployment)["env"]
            if v["name"] == f"ONPOLICY_{deployment.upper()}_MAX_LORA_RANK"
        )
        assert var["valueFrom"]["configMapKeyRef"]["key"] == "MAX_LORA_RANK"
