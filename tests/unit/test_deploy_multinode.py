"""deploy/k8s/examples/multinode: the trainer over several nodes. Its pieces fit together:
the rendezvous host is the service's pod, c10d gives that pod rank 0, every node is counted,
the ranks can reach each other, and both sides start with settings the trainer accepts."""

from __future__ import annotations

from pathlib import Path

import pytest
from _deploy import built, load_service_settings, tools_or_fail, unknown_env
from test_deploy_k8s import config_map_named, env_of, named

from onpolicy_trainer.launch import torchrun_command

OVERLAY = "examples/multinode"


@pytest.fixture(scope="module", autouse=True)
def _tools() -> None:
    tools_or_fail()


def _pods():
    objects = built(OVERLAY)
    service = named(objects, "Deployment", "trainer")
    worker = named(objects, "StatefulSet", "trainer-worker")
    return objects, service, worker


def _container(workload):
    return next(
        c for c in workload["spec"]["template"]["spec"]["containers"] if c["name"] == "trainer"
    )


def test_rank_zero_is_the_services_pod_and_every_node_is_counted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    objects, service, worker = _pods()
    config = tmp_path / "config.yaml"
    config.write_text(config_map_named(objects, "onpolicy-config-")["data"]["config.yaml"])
    service_env = env_of(objects, _container(service))
    worker_env = env_of(objects, _container(worker))
    for env in (service_env, worker_env):
        assert unknown_env("trainer", env) == []
    ours = load_service_settings("trainer", service_env, config, monkeypatch)
    theirs = load_service_settings("trainer", worker_env, config, monkeypatch)
    assert ours.distributed == "fsdp"
    assert ours.nnodes == theirs.nnodes == 1 + worker["spec"]["replicas"]
    assert ours.rdzv_endpoint == theirs.rdzv_endpoint
    # The endpoint is the service's pod (hostname.subdomain), on its rendezvous port.
    spec = service["spec"]["template"]["spec"]
    host, port = ours.rdzv_endpoint.rsplit(":", 1)
    assert host == f"{spec['hostname']}.{spec['subdomain']}" == service_env["PET_LOCAL_ADDR"]
    ranks = named(objects, "Service", "trainer-ranks")
    assert spec["subdomain"] == worker["spec"]["serviceName"] == ranks["metadata"]["name"]
    assert ranks["spec"]["clusterIP"] == "None" and ranks["spec"]["publishNotReadyAddresses"]
    assert [p["port"] for p in ranks["spec"]["ports"]] == [int(port)]
    # c10d orders nodes by address: the service's must sort before every worker's.
    workers = [
        worker_env["PET_LOCAL_ADDR"].replace("$(POD_NAME)", f"trainer-worker-{i}")
        for i in range(12)
    ]
    assert all(service_env["PET_LOCAL_ADDR"] < w for w in workers)
    # The service hosts the store; the workers join it for every round.
    assert "--rdzv-conf=is_host=true" in torchrun_command(ours, 8, "/job")
    command = torchrun_command(theirs, 8, "--worker")
    assert "--rdzv-conf=is_host=false" in command and f"--nnodes={ours.nnodes}" in command
    assert _container(worker)["command"][-2:] == ["onpolicy_trainer.launch", "--follow"]


def test_ranks_reach_each_other_and_the_worker_is_hardened() -> None:
    objects, service, worker = _pods()
    label = {"onpolicy.io/trainer-ranks": "true"}
    for workload in (service, worker):
        assert label.items() <= workload["spec"]["template"]["metadata"]["labels"].items()
    (policy,) = [
        p
        for p in objects
        if p["kind"] == "NetworkPolicy" and p["spec"]["podSelector"].get("matchLabels") == label
    ]
    assert policy["spec"]["ingress"] == [{"from": [{"podSelector": {"matchLabels": label}}]}]
    spec = worker["spec"]["template"]["spec"]
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["runAsUser"] == 10001
    for c in spec["initContainers"] + spec["containers"]:
        sc = c["securityContext"]
        assert sc["readOnlyRootFilesystem"] is True and sc["capabilities"]["drop"] == ["ALL"]
        assert {"cpu", "memory"} <= set(c["resources"]["requests"])
    gpus = [int(_container(w)["resources"]["limits"]["nvidia.com/gpu"]) for w in (service, worker)]
    assert gpus[0] == gpus[1] == 8  # one node each, the same ranks per node
    # The same model folder on every node (the shared cache claim).
    claims = {
        v["persistentVolumeClaim"]["claimName"]
        for v in spec["volumes"]
        if "persistentVolumeClaim" in v
    }
    assert claims == {"onpolicy-model-cache"}
