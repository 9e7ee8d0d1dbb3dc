"""``make deploy-check``: every overlay applied to a real Kubernetes control plane.

For each case (an overlay and a cluster shaped like the one it is meant for) this starts
etcd (Debian's etcd-server), kube-apiserver, kube-controller-manager and kube-scheduler
(built once by build-k8s.sh from the Go module k8s.io/kubernetes) on loopback addresses only,
with their data in a temporary folder; installs the Strimzi, KEDA and Prometheus Operator
CRDs (install.sh's files); creates the nodes (labels, taints, nvidia.com/gpu capacity, Ready
and without the not-ready taint: no kubelet runs), storage classes and static volumes; then:

1. applies the overlay (``kubectl apply --server-side``) and counts the objects the API server
   accepted and the namespaced ones that landed outside the namespace ``onpolicy``;
2. waits for the controllers and the scheduler: every pod of the pipeline (the sampler, judge
   and trainer Deployments' and the model Job's) must be bound to a node of the pool it is
   meant for, every claim bound to a volume;
3. creates the Hugging Face token Secret and scales the KEDA-scaled Deployments as KEDA would,
   applies again and requires that nothing changed (generations, data, the Secret, replicas);
4. runs pods shaped like Strimzi's Kafka broker pods (the KafkaNodePool's affinity and
   spread; no Strimzi operator runs) and reports how many nodes and zones they span.

No kubelet runs, so no container starts: "scheduled" means bound by the scheduler. Writes
benchmarks/results/deploy_check.json; exits 1 when any requirement fails. Every process it
starts is stopped at the end, also on Ctrl-C.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import deploycheck as dc

NAMESPACE = "onpolicy"
RESULTS = dc.REPO / "benchmarks" / "results" / "deploy_check.json"
# The pods of the pipeline, by their app.kubernetes.io/name label.
PIPELINE = ("sampler", "judge", "trainer", "models")
# What KEDA would do between two applies.
SCALED = {"sampler": 2, "judge": 3}
TOKEN = "hf_deploy_check_not_a_real_token"
GiB = 1024**3


# ------------------------------------------------------------------ cluster shapes
@dataclass
class Node:
    name: str
    pool: str
    labels: dict[str, str]
    cpu: int = 16
    memory_gi: int = 64
    gpus: int = 0
    taints: list[dict[str, str]] = field(default_factory=list)


@dataclass
class Volume:
    name: str
    size: str
    access: str
    storage_class: str
    source: dict[str, Any]


@dataclass
class Case:
    overlay: str
    cluster: str
    nodes: list[Node]
    storage_classes: list[dict[str, Any]]
    volumes: list[Volume]
    # app.kubernetes.io/name -> the pools its pods may land on
    placement: dict[str, set[str]]
    # where Kafka's brokers may land
    kafka_pools: set[str] = field(default_factory=lambda: {"cpu"})


def _zone_nodes(
    prefix: str, pool: str, zones: list[str], labels: dict[str, str], cloud: bool = True
) -> list[Node]:
    """One node per zone; a cloud's region is the zone without its letter (us-east-1a)."""
    nodes = []
    for i, zone in enumerate(zones):
        topology = {"topology.kubernetes.io/zone": zone}
        if cloud:
            topology["topology.kubernetes.io/region"] = zone[:-1].rstrip("-")
        nodes.append(Node(f"{prefix}-{i}", pool, {**topology, **labels}))
    return nodes


def _sc(name: str, provisioner: str, mode: str, default: bool = False, **params) -> dict[str, Any]:
    sc: dict[str, Any] = {
        "apiVersion": "storage.k8s.io/v1",
        "kind": "StorageClass",
        "metadata": {"name": name},
        "provisioner": provisioner,
        "volumeBindingMode": mode,
        "reclaimPolicy": "Delete",
    }
    if default:
        sc["metadata"]["annotations"] = {"storageclass.kubernetes.io/is-default-class": "true"}
    if params:
        sc["parameters"] = params
    return sc


def _csi(driver: str, handle: str) -> dict[str, Any]:
    return {"csi": {"driver": driver, "volumeHandle": handle}}


def cases() -> list[Case]:
    gpu_taint_gke = [{"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}]
    gpu_taint_eks = [{"key": "nvidia.com/gpu", "value": "true", "effect": "NoSchedule"}]
    gke_zones = ["us-central1-a", "us-central1-b", "us-central1-c"]
    eks_zones = ["us-east-1a", "us-east-1b", "us-east-1c"]
    return [
        Case(
            overlay="dev",
            cluster="kind (one node, local-path storage)",
            nodes=[
                Node(
                    "kind-control-plane",
                    "cpu",
                    {"node-role.kubernetes.io/control-plane": ""},
                    cpu=8,
                    memory_gi=32,
                )
            ],
            storage_classes=[
                _sc("standard", "rancher.io/local-path", "WaitForFirstConsumer", True)
            ],
            volumes=[
                Volume(
                    f"local-{i}",
                    "10Gi",
                    "ReadWriteOnce",
                    "standard",
                    {"hostPath": {"path": f"/var/local-path-provisioner/pv-{i}"}},
                )
                for i in range(2)
            ],
            placement={name: {"cpu"} for name in PIPELINE},
        ),
        Case(
            overlay="gke",
            cluster="GKE (CPU pool in 3 zones, H100 and L4 GPU pools, Filestore)",
            nodes=[
                *_zone_nodes(
                    "gke-cpu",
                    "cpu",
                    gke_zones,
                    {
                        "cloud.google.com/gke-nodepool": "cpu",
                        "node.kubernetes.io/instance-type": "n2-standard-16",
                    },
                ),
                Node(
                    "gke-h100-0",
                    "gpu-h100",
                    {
                        "topology.kubernetes.io/zone": "us-central1-a",
                        "topology.kubernetes.io/region": "us-central1",
                        "cloud.google.com/gke-nodepool": "h100",
                        "cloud.google.com/gke-accelerator": "nvidia-h100-80gb",
                        "node.kubernetes.io/instance-type": "a3-highgpu-8g",
                    },
                    cpu=208,
                    memory_gi=1872,
                    gpus=8,
                    taints=gpu_taint_gke,
                ),
                Node(
                    "gke-l4-0",
                    "gpu-l4",
                    {
                        "topology.kubernetes.io/zone": "us-central1-b",
                        "topology.kubernetes.io/region": "us-central1",
                        "cloud.google.com/gke-nodepool": "l4",
                        "cloud.google.com/gke-accelerator": "nvidia-l4",
                        "node.kubernetes.io/instance-type": "g2-standard-48",
                    },
                    cpu=48,
                    memory_gi=192,
                    gpus=4,
                    taints=gpu_taint_gke,
                ),
            ],
            storage_classes=[
                _sc(
                    "standard-rwo",
                    "pd.csi.storage.gke.io",
                    "WaitForFirstConsumer",
                    True,
                    type="pd-balanced",
                ),
                _sc(
                    "standard-rwx",
                    "filestore.csi.storage.gke.io",
                    "WaitForFirstConsumer",
                    tier="standard",
                    network="default",
                ),
            ],
            volumes=[
                Volume(
                    f"filestore-{i}",
                    "1Ti",
                    "ReadWriteMany",
                    "standard-rwx",
                    _csi(
                        "filestore.csi.storage.gke.io",
                        f"modeInstance/us-central1-a/onpolicy-{i}/vol1",
                    ),
                )
                for i in range(2)
            ],
            placement={
                "sampler": {"gpu-h100"},
                "trainer": {"gpu-h100"},
                "judge": {"gpu-h100", "gpu-l4"},
                "models": {"cpu"},
            },
        ),
        Case(
            overlay="eks",
            cluster="EKS (CPU node group in 3 zones, p5 and g6 GPU node groups, EFS)",
            nodes=[
                *_zone_nodes(
                    "eks-cpu",
                    "cpu",
                    eks_zones,
                    {
                        "eks.amazonaws.com/nodegroup": "cpu",
                        "eks.amazonaws.com/capacityType": "ON_DEMAND",
                        "node.kubernetes.io/instance-type": "m6i.4xlarge",
                    },
                ),
                Node(
                    "eks-p5-0",
                    "gpu-h100",
                    {
                        "topology.kubernetes.io/zone": "us-east-1a",
                        "topology.kubernetes.io/region": "us-east-1",
                        "eks.amazonaws.com/nodegroup": "gpu-p5",
                        "eks.amazonaws.com/capacityType": "ON_DEMAND",
                        "node.kubernetes.io/instance-type": "p5.48xlarge",
                    },
                    cpu=192,
                    memory_gi=2048,
                    gpus=8,
                    taints=gpu_taint_eks,
                ),
                Node(
                    "eks-g6-0",
                    "gpu-l4",
                    {
                        "topology.kubernetes.io/zone": "us-east-1b",
                        "topology.kubernetes.io/region": "us-east-1",
                        "eks.amazonaws.com/nodegroup": "gpu-g6",
                        "eks.amazonaws.com/capacityType": "ON_DEMAND",
                        "node.kubernetes.io/instance-type": "g6.12xlarge",
                    },
                    cpu=48,
                    memory_gi=192,
                    gpus=4,
                    taints=gpu_taint_eks,
                ),
            ],
            # EKS's default class; onpolicy-efs comes with the overlay (components/eks).
            storage_classes=[_sc("gp2", "kubernetes.io/aws-ebs", "WaitForFirstConsumer", True)],
            volumes=[
                Volume(
                    f"efs-{i}",
                    "100Gi",
                    "ReadWriteMany",
                    "onpolicy-efs",
                    _csi("efs.csi.aws.com", f"fs-0123456789abcdef0::fsap-000000000000000{i}"),
                )
                for i in range(2)
            ],
            placement={
                "sampler": {"gpu-h100"},
                "trainer": {"gpu-h100"},
                "judge": {"gpu-h100", "gpu-l4"},
                "models": {"cpu"},
            },
        ),
        Case(
            overlay="gpu-operator",
            cluster="GPU Operator (3 CPU nodes in 3 racks, untainted H100 and L40S nodes, NFS)",
            nodes=[
                *_zone_nodes("cpu", "cpu", ["rack-a", "rack-b", "rack-c"], {}, cloud=False),
                Node(
                    "dgx-h100-0",
                    "gpu-h100",
                    {
                        "topology.kubernetes.io/zone": "rack-a",
                        "nvidia.com/gpu.present": "true",
                        "nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3",
                        "nvidia.com/gpu.count": "8",
                        "nvidia.com/gpu.memory": "81559",
                    },
                    cpu=224,
                    memory_gi=2048,
                    gpus=8,
                ),
                Node(
                    "l40s-0",
                    "gpu-l40s",
                    {
                        "topology.kubernetes.io/zone": "rack-b",
                        "nvidia.com/gpu.present": "true",
                        "nvidia.com/gpu.product": "NVIDIA-L40S",
                        "nvidia.com/gpu.count": "4",
                        "nvidia.com/gpu.memory": "46068",
                    },
                    cpu=64,
                    memory_gi=512,
                    gpus=4,
                ),
            ],
            storage_classes=[
                _sc("nfs-client", "cluster.local/nfs-subdir-external-provisioner", "Immediate")
            ],
            volumes=[
                Volume(
                    f"nfs-{i}",
                    "500Gi",
                    "ReadWriteMany",
                    "nfs-client",
                    {"nfs": {"server": "nfs.invalid", "path": f"/exports/onpolicy-{i}"}},
                )
                for i in range(2)
            ],
            placement={
                "sampler": {"gpu-h100"},
                "trainer": {"gpu-h100"},
                "judge": {"gpu-h100", "gpu-l40s"},
                # The GPU nodes are untainted: node affinity keeps the Job off them.
                "models": {"cpu"},
            },
        ),
    ]


# ------------------------------------------------------------------ processes
def say(message: str) -> None:
    print(f"deploy-check: {message}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    """In the child before exec: killed when the check's process dies, even by SIGKILL."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class Processes:
    """Processes started here, each in its own session; stop() ends every one of them."""

    def __init__(self) -> None:
        self.procs: list[tuple[str, subprocess.Popen]] = []

    def start(self, name: str, argv: list[str], log: Path) -> subprocess.Popen:
        out = log.open("wb")
        proc = subprocess.Popen(
            argv,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
        out.close()
        self.procs.append((name, proc))
        return proc

    def check_alive(self) -> None:
        for name, proc in self.procs:
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode}")

    def stop(self) -> None:
        # One at a time, the last started first: the API server shuts down cleanly only
        # while etcd still answers.
        for _, proc in reversed(self.procs):
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.procs.clear()


def wait_for(what: str, test: Callable[[], bool], timeout: float, procs: Processes) -> None:
    deadline = time.monotonic() + timeout
    while True:
        procs.check_alive()
        with contextlib.suppress(Exception):
            if test():
                return
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.25)


class ControlPlane:
    """etcd + kube-apiserver + kube-controller-manager + kube-scheduler on loopback."""

    def __init__(self, bindir: Path, work: Path, etcd: str) -> None:
        self.bindir, self.work, self.etcd = bindir, work, etcd
        self.procs = Processes()
        self.kubeconfig = work / "kubeconfig"

    def start(self) -> float:
        started = time.monotonic()
        w = self.work
        client, peer, secure = free_port(), free_port(), free_port()
        etcd_url = f"http://127.0.0.1:{client}"
        self.procs.start(
            "etcd",
            [
                self.etcd,
                "--name=check",
                f"--data-dir={w / 'etcd'}",
                f"--listen-client-urls={etcd_url}",
                f"--advertise-client-urls={etcd_url}",
                f"--listen-peer-urls=http://127.0.0.1:{peer}",
                f"--initial-advertise-peer-urls=http://127.0.0.1:{peer}",
                f"--initial-cluster=check=http://127.0.0.1:{peer}",
                "--logger=zap",
                "--log-level=warn",
            ],
            w / "etcd.log",
        )
        wait_for("etcd", lambda: _http_ok(f"{etcd_url}/health"), 30, self.procs)

        key, pub = w / "sa.key", w / "sa.pub"
        subprocess.run(
            ["openssl", "genrsa", "-out", str(key), "2048"], check=True, capture_output=True
        )
        subprocess.run(
            ["openssl", "rsa", "-in", str(key), "-pubout", "-out", str(pub)],
            check=True,
            capture_output=True,
        )
        token = hashlib.sha256(os.urandom(32)).hexdigest()
        (w / "tokens.csv").write_text(f"{token},deploy-check,deploy-check,system:masters\n")
        (w / "certs").mkdir()
        self.procs.start(
            "kube-apiserver",
            [
                str(self.bindir / "kube-apiserver"),
                f"--etcd-servers={etcd_url}",
                "--bind-address=127.0.0.1",
                "--advertise-address=127.0.0.1",
                f"--secure-port={secure}",
                f"--cert-dir={w / 'certs'}",
                f"--token-auth-file={w / 'tokens.csv'}",
                "--authorization-mode=RBAC",
                "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
                f"--service-account-key-file={pub}",
                f"--service-account-signing-key-file={key}",
                "--service-cluster-ip-range=10.96.0.0/16",
                "--allow-privileged=true",
                "--profiling=false",
            ],
            w / "kube-apiserver.log",
        )
        self.kubeconfig.write_text(
            json.dumps(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "clusters": [
                        {
                            "name": "check",
                            "cluster": {
                                "server": f"https://127.0.0.1:{secure}",
                                "insecure-skip-tls-verify": True,
                            },
                        }
                    ],
                    "users": [{"name": "check", "user": {"token": token}}],
                    "contexts": [
                        {"name": "check", "context": {"cluster": "check", "user": "check"}}
                    ],
                    "current-context": "check",
                }
            )
        )
        wait_for(
            "kube-apiserver /readyz",
            lambda: self.kubectl("get", "--raw=/readyz", check=False).returncode == 0,
            90,
            self.procs,
        )
        # No kubelet heartbeats: the node lifecycle controller would mark every node
        # unreachable and evict; the nodes' health is set by hand instead (add_node).
        self.procs.start(
            "kube-controller-manager",
            [
                str(self.bindir / "kube-controller-manager"),
                f"--kubeconfig={self.kubeconfig}",
                "--leader-elect=false",
                "--secure-port=0",
                "--controllers=*,-nodelifecycle",
                f"--service-account-private-key-file={key}",
                f"--root-ca-file={w / 'certs' / 'apiserver.crt'}",
            ],
            w / "kube-controller-manager.log",
        )
        self.procs.start(
            "kube-scheduler",
            [
                str(self.bindir / "kube-scheduler"),
                f"--kubeconfig={self.kubeconfig}",
                "--leader-elect=false",
                "--secure-port=0",
            ],
            w / "kube-scheduler.log",
        )
        return time.monotonic() - started

    def stop(self) -> None:
        self.procs.stop()

    def kubectl(
        self, *args: str, stdin: str | None = None, check: bool = True
    ) -> subprocess.CompletedProcess:
        result = subprocess.run(
            [str(self.bindir / "kubectl"), f"--kubeconfig={self.kubeconfig}", *args],
            input=stdin,
            capture_output=True,
            text=True,
            check=False,
        )
        if check and result.returncode != 0:
            raise RuntimeError(f"kubectl {' '.join(args)}: {result.stderr.strip()}")
        return result

    def get_json(self, *args: str) -> dict[str, Any]:
        return json.loads(self.kubectl("get", "-o", "json", *args).stdout)


def _http_ok(url: str) -> bool:
    with urllib.request.urlopen(url, timeout=2) as response:
        return response.status == 200


# ------------------------------------------------------------------ the check
def crd_files() -> list[Path]:
    files = []
    for name, key in (
        ("strimzi", "STRIMZI_VERSION"),
        ("keda", "KEDA_VERSION"),
        ("prometheus-operator", "PROMETHEUS_OPERATOR_VERSION"),
    ):
        files += sorted(dc.schema_dir(name, key).glob("*.yaml"))
    return files


def add_node(cp: ControlPlane, node: Node) -> None:
    labels = {
        "kubernetes.io/hostname": node.name,
        "kubernetes.io/os": "linux",
        "kubernetes.io/arch": "amd64",
        **node.labels,
    }
    cp.kubectl(
        "create",
        "-f",
        "-",
        stdin=json.dumps(
            {
                "apiVersion": "v1",
                "kind": "Node",
                "metadata": {"name": node.name, "labels": labels},
                "spec": {"taints": node.taints},
            }
        ),
    )
    capacity = {
        "cpu": str(node.cpu),
        "memory": f"{node.memory_gi}Gi",
        "pods": "110",
        "ephemeral-storage": "500Gi",
    }
    if node.gpus:
        capacity["nvidia.com/gpu"] = str(node.gpus)
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    conditions = [
        {"type": t, "status": s, "reason": r, "lastHeartbeatTime": now, "lastTransitionTime": now}
        for t, s, r in (
            ("Ready", "True", "KubeletReady"),
            ("MemoryPressure", "False", "KubeletHasSufficientMemory"),
            ("DiskPressure", "False", "KubeletHasNoDiskPressure"),
            ("PIDPressure", "False", "KubeletHasSufficientPID"),
        )
    ]
    cp.kubectl(
        "patch",
        "node",
        node.name,
        "--subresource=status",
        "--type=merge",
        "-p",
        json.dumps(
            {"status": {"capacity": capacity, "allocatable": capacity, "conditions": conditions}}
        ),
    )
    # Drop node.kubernetes.io/not-ready (added at creation; a kubelet's Ready clears it).
    cp.kubectl(
        "patch",
        "node",
        node.name,
        "--type=json",
        "-p",
        json.dumps([{"op": "replace", "path": "/spec/taints", "value": node.taints}]),
    )


def add_storage(cp: ControlPlane, case: Case) -> None:
    objects: list[dict[str, Any]] = list(case.storage_classes)
    for vol in case.volumes:
        objects.append(
            {
                "apiVersion": "v1",
                "kind": "PersistentVolume",
                "metadata": {"name": vol.name},
                "spec": {
                    "capacity": {"storage": vol.size},
                    "accessModes": [vol.access],
                    "storageClassName": vol.storage_class,
                    "persistentVolumeReclaimPolicy": "Retain",
                    **vol.source,
                },
            }
        )
    cp.kubectl(
        "create",
        "-f",
        "-",
        stdin=json.dumps({"apiVersion": "v1", "kind": "List", "items": objects}),
    )


def namespaced_kinds(cp: ControlPlane) -> dict[tuple[str, str], bool]:
    """(group, kind) -> namespaced, from the API server's discovery."""
    out = cp.kubectl("api-resources", "--no-headers").stdout
    kinds = {}
    for line in out.splitlines():
        words = line.split()
        kind, namespaced, api_version = words[-1], words[-2] == "true", words[-3]
        group = api_version.rpartition("/")[0]
        kinds[(group, kind)] = namespaced
    return kinds


def group_of(obj: dict[str, Any]) -> str:
    return obj["apiVersion"].rpartition("/")[0]


def apply(cp: ControlPlane, manifest: str, *flags: str) -> tuple[list[dict[str, Any]], str]:
    result = cp.kubectl(
        "apply",
        "--server-side",
        "--field-manager=onpolicy",
        *flags,
        "-o",
        "json",
        "-f",
        "-",
        stdin=manifest,
        check=False,
    )
    items: list[dict[str, Any]] = []
    decoder = json.JSONDecoder()
    text, pos = result.stdout, 0
    while pos < len(text):
        while pos < len(text) and text[pos].isspace():
            pos += 1
        if pos >= len(text):
            break
        doc, pos = decoder.raw_decode(text, pos)
        items += doc.get("items", []) if doc.get("kind") == "List" else [doc]
    return items, result.stderr.strip() if result.returncode else ""


def fingerprint(obj: dict[str, Any]) -> str:
    """What an apply may change: the generation where the API keeps one, else the content."""
    meta = obj["metadata"]
    if "generation" in meta:
        return f"generation {meta['generation']}"
    body = {k: v for k, v in obj.items() if k not in ("metadata", "status")}
    body["labels"] = meta.get("labels")
    body["annotations"] = meta.get("annotations")
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16]


def state(cp: ControlPlane, manifest: str) -> dict[str, str]:
    """Each applied object's fingerprint, as the API server has it now."""
    items = json.loads(cp.kubectl("get", "-f", "-", "-o", "json", stdin=manifest).stdout)
    return {
        f"{o['kind']}/{o['metadata']['name']}": fingerprint(o) for o in items.get("items", [items])
    }


def pipeline_pods(cp: ControlPlane) -> list[dict[str, Any]]:
    pods = cp.get_json("pods", "-n", NAMESPACE)["items"]
    return [
        p for p in pods if p["metadata"].get("labels", {}).get("app.kubernetes.io/name") in PIPELINE
    ]


def unscheduled_reason(pod: dict[str, Any]) -> str:
    for cond in pod.get("status", {}).get("conditions", []):
        if cond["type"] == "PodScheduled" and cond["status"] != "True":
            return cond.get("message", cond.get("reason", ""))
    return "not bound yet"


def kafka_probe(cp: ControlPlane, objects: list[dict[str, Any]], pools: dict[str, str]) -> dict:
    """Pods shaped like Strimzi's broker pods: where would the scheduler put the brokers?"""
    kafka = next(o for o in objects if o["kind"] == "Kafka")
    cluster = kafka["metadata"]["name"]
    rack = kafka["spec"]["kafka"].get("rack", {}).get("topologyKey")
    probes: list[dict[str, Any]] = []
    extras: list[dict[str, Any]] = []
    for pool in (o for o in objects if o["kind"] == "KafkaNodePool"):
        template = pool["spec"].get("template", {}).get("pod", {})
        name = pool["metadata"]["name"]
        affinity = json.loads(json.dumps(template.get("affinity", {})))
        if rack:  # Strimzi adds "the node has the rack label" to every required term
            required = affinity.setdefault("nodeAffinity", {}).setdefault(
                "requiredDuringSchedulingIgnoredDuringExecution", {"nodeSelectorTerms": [{}]}
            )
            for term in required["nodeSelectorTerms"]:
                term.setdefault("matchExpressions", []).append({"key": rack, "operator": "Exists"})
        spec: dict[str, Any] = {
            "containers": [
                {
                    "name": "kafka",
                    "image": "registry.k8s.io/pause:3.10",
                    "resources": pool["spec"].get("resources", {}),
                }
            ],
            "affinity": affinity,
            "topologySpreadConstraints": template.get("topologySpreadConstraints", []),
        }
        replicas = pool["spec"]["replicas"]
        for i in range(replicas + (replicas > 1)):
            pod = {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {
                    "name": f"kafka-probe-{name}-{i if i < replicas else 'extra'}",
                    "namespace": NAMESPACE,
                    "labels": {
                        "strimzi.io/cluster": cluster,
                        "strimzi.io/pool-name": name,
                        "strimzi.io/kind": "Kafka",
                        "onpolicy.deploy-check/probe": "kafka" if i < replicas else "extra",
                    },
                },
                "spec": {k: v for k, v in spec.items() if v},
            }
            (probes if i < replicas else extras).append(pod)

    def listed(kind: str) -> list[dict[str, Any]]:
        selector = f"onpolicy.deploy-check/probe={kind}"
        return cp.get_json("pods", "-n", NAMESPACE, "-l", selector)["items"]

    def settle(kind: str, pods: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Create the pods; wait until each is bound or refused by the scheduler."""
        cp.kubectl(
            "create",
            "-f",
            "-",
            stdin=json.dumps({"kind": "List", "apiVersion": "v1", "items": pods}),
        )
        deadline = time.monotonic() + 30
        while True:
            now = listed(kind)
            if time.monotonic() > deadline or all(
                p["spec"].get("nodeName") or unscheduled_reason(p) != "not bound yet" for p in now
            ):
                return now
            time.sleep(0.5)

    pods = settle("kafka", probes)
    # One broker more than the pool has, once the others are placed: on a cluster with as
    # many eligible nodes as brokers, only a rule keeping brokers apart refuses it.
    extra = (
        settle("extra", extras) if extras and all(p["spec"].get("nodeName") for p in pods) else []
    )
    nodes = cp.get_json("nodes")["items"]
    zone_of = {
        n["metadata"]["name"]: n["metadata"]["labels"].get("topology.kubernetes.io/zone")
        for n in nodes
    }
    placed = [p["spec"].get("nodeName") for p in pods]
    on = [n for n in placed if n]
    return {
        "brokers": len(pods),
        "scheduled": len(on),
        "nodes": len(set(on)),
        "zones": len({zone_of[n] for n in on if zone_of[n]}),
        "zones_in_cluster": len({z for z in zone_of.values() if z}),
        "placements": {
            p["metadata"]["name"]: p["spec"].get("nodeName") or unscheduled_reason(p) for p in pods
        },
        "pools": sorted({pools[n] for n in on}),
        "extra_broker": {
            p["metadata"]["name"]: (
                f"bound to {p['spec']['nodeName']}"
                if p["spec"].get("nodeName")
                else f"refused: {unscheduled_reason(p)}"
            )
            for p in extra
        },
    }


def run_case(case: Case, bindir: Path, etcd: str, work: Path, wait_s: float) -> dict[str, Any]:
    started = time.monotonic()
    overlay_dir = dc.K8S / "overlays" / case.overlay
    objects = dc.kustomize_build(overlay_dir)
    manifest = "\n---\n".join(json.dumps(o) for o in objects)
    cp = ControlPlane(bindir, work, etcd)
    failures: list[str] = []
    try:
        startup_s = cp.start()
        say(f"{case.overlay}: control plane ready in {startup_s:.1f} s")
        cp.kubectl("apply", "--server-side", *(f"--filename={f}" for f in crd_files()))
        cp.kubectl("wait", "--for=condition=Established", "crd", "--all", "--timeout=60s")
        for node in case.nodes:
            add_node(cp, node)
        add_storage(cp, case)
        pools = {n.name: n.pool for n in case.nodes}
        kinds = namespaced_kinds(cp)

        # 1. apply: accepted, and in the namespace
        applied, errors = apply(cp, manifest)
        if errors:
            failures.append(f"apply: {errors}")
        misplaced = []
        for obj in applied:
            namespaced = kinds.get((group_of(obj), obj["kind"]), True)
            ns = obj["metadata"].get("namespace")
            if namespaced and ns != NAMESPACE:
                misplaced.append(f"{obj['kind']}/{obj['metadata']['name']} in {ns}")
        if len(applied) != len(objects):
            failures.append(f"{len(objects) - len(applied)} objects not accepted")
        failures += [f"outside {NAMESPACE}: {m}" for m in misplaced]

        # 2. pods scheduled on the right pool, claims bound
        expected = {
            name
            for name in PIPELINE
            if any(
                o["kind"] in ("Deployment", "Job")
                and o["metadata"]["name"] in (name, f"onpolicy-{name}")
                for o in objects
            )
        }
        deadline = time.monotonic() + wait_s
        while True:
            pods = pipeline_pods(cp)
            claims = cp.get_json("pvc", "-n", NAMESPACE)["items"]
            names = {p["metadata"]["labels"]["app.kubernetes.io/name"] for p in pods}
            done = (
                names >= expected
                and all(p["spec"].get("nodeName") for p in pods)
                and all(c.get("status", {}).get("phase") == "Bound" for c in claims)
            )
            if done or time.monotonic() > deadline:
                break
            cp.procs.check_alive()
            time.sleep(0.5)
        placements, scheduled = {}, 0
        for pod in sorted(pods, key=lambda p: p["metadata"]["name"]):
            app = pod["metadata"]["labels"]["app.kubernetes.io/name"]
            node = pod["spec"].get("nodeName")
            pool = pools.get(node) if node else None
            ok = pool in case.placement[app]
            scheduled += ok
            placements[pod["metadata"]["name"]] = (
                f"{node} ({pool})" if node else f"unscheduled: {unscheduled_reason(pod)}"
            )
            if not ok:
                failures.append(
                    f"pod {pod['metadata']['name']}: {placements[pod['metadata']['name']]}"
                    f", expected a node of {sorted(case.placement[app])}"
                )
        for app in sorted(expected - names):
            failures.append(f"no pod of {app} was created")
        bound = [c for c in claims if c.get("status", {}).get("phase") == "Bound"]
        for claim in claims:
            if claim not in bound:
                failures.append(
                    f"claim {claim['metadata']['name']} is {claim.get('status', {}).get('phase')}"
                )
        claims_total = sum(o["kind"] == "PersistentVolumeClaim" for o in objects)

        # 3. a second apply changes nothing that matters
        # The token as the guide sets it (deploy/README.md).
        secret_yaml = cp.kubectl(
            "create",
            "secret",
            "generic",
            "onpolicy-hf-token",
            "-n",
            NAMESPACE,
            f"--from-literal=token={TOKEN}",
            "--dry-run=client",
            "-o",
            "yaml",
        ).stdout
        cp.kubectl("apply", "-f", "-", stdin=secret_yaml)
        scaled = {}
        for name, replicas in SCALED.items():
            if any(
                o["kind"] == "ScaledObject" and o["spec"]["scaleTargetRef"]["name"] == name
                for o in objects
            ):
                cp.kubectl("scale", "deployment", name, "-n", NAMESPACE, f"--replicas={replicas}")
                scaled[name] = replicas
        before = state(cp, manifest)
        # As GitOps tools apply: taking over fields that others set (KEDA's replicas).
        _, errors = apply(cp, manifest, "--force-conflicts")
        if errors:
            failures.append(f"second apply: {errors}")
        after = state(cp, manifest)
        changed = sorted(ref for ref in before if before[ref] != after.get(ref))
        failures += [f"second apply changed {ref}" for ref in changed]
        secret = cp.get_json("secret", "onpolicy-hf-token", "-n", NAMESPACE)
        token_kept = base64.b64decode(secret["data"].get("token", "")).decode() == TOKEN
        if not token_kept:
            failures.append("second apply changed the Secret onpolicy-hf-token")
        replicas_kept = {}
        for name, replicas in scaled.items():
            now = cp.get_json("deployment", name, "-n", NAMESPACE)["spec"]["replicas"]
            replicas_kept[name] = now
            if now != replicas:
                failures.append(f"second apply set {name} replicas to {now} (KEDA set {replicas})")

        # 4. Kafka brokers' spread
        kafka = kafka_probe(cp, objects, pools)
        if kafka["scheduled"] != kafka["brokers"]:
            failures.append(f"Kafka broker probe: {kafka['placements']}")
        elif any(v.startswith("bound") for v in kafka["extra_broker"].values()):
            failures.append(
                f"Kafka: one broker more than the pool's replicas was placed too "
                f"({kafka['extra_broker']}): nothing keeps two brokers off one node"
            )
        elif not set(kafka["pools"]) <= case.kafka_pools:
            failures.append(f"Kafka brokers on {kafka['pools']}, expected {case.kafka_pools}")
        elif kafka["brokers"] > 1 and (
            kafka["nodes"] < kafka["brokers"]
            or kafka["zones"] < min(kafka["brokers"], kafka["zones_in_cluster"])
        ):
            failures.append(f"Kafka brokers not spread: {kafka['placements']}")
        return {
            "overlay": case.overlay,
            "cluster": case.cluster,
            "nodes": [
                {
                    "name": n.name,
                    "pool": n.pool,
                    "gpus": n.gpus,
                    "zone": n.labels.get("topology.kubernetes.io/zone"),
                    "taints": [f"{t['key']}={t.get('value', '')}:{t['effect']}" for t in n.taints],
                }
                for n in case.nodes
            ],
            "objects": len(objects),
            "accepted": len(applied),
            "pods_scheduled": scheduled,
            "pods_total": len(pods),
            "claims_bound": len(bound),
            "claims_total": claims_total,
            "misplaced_objects": misplaced,
            "placements": placements,
            "second_apply": {
                "changed": changed,
                "secret_kept": token_kept,
                "replicas": replicas_kept,
                "replicas_set_by_keda": scaled,
            },
            "kafka_brokers": kafka,
            "control_plane_start_s": round(startup_s, 1),
            "case_s": round(time.monotonic() - started, 1),
            "failures": failures,
        }
    finally:
        cp.stop()


def build_tools() -> tuple[Path, float, bool]:
    tools = dc.TOOLS_DIR
    started = time.monotonic()
    marker = dc.cache_dir() / f"k8s-{dc.versions()['K8S_VERSION']}" / ".complete"
    cached = marker.exists()
    out = subprocess.run(
        [str(tools / "build-k8s.sh")],
        check=True,
        capture_output=False,
        stdout=subprocess.PIPE,
        text=True,
    ).stdout
    return Path(out.strip().splitlines()[-1]), time.monotonic() - started, not cached


def _first_build_s(bindir: Path) -> int | None:
    try:
        return int((bindir.parent / "build_seconds").read_text())
    except (OSError, ValueError):
        return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--overlay", action="append", help="only these overlays (repeatable)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--wait", type=float, default=120.0, help="seconds to wait for pods")
    parser.add_argument("--keep", action="store_true", help="keep the logs and data folder")
    args = parser.parse_args(argv)
    started = time.monotonic()
    etcd = shutil.which("etcd")
    if etcd is None:
        say("error: etcd is missing (apt-get install etcd-server)")
        return 1
    try:
        dc.kustomize_bin()
        crd_files()
    except dc.ToolsMissing as exc:
        say(f"error: {exc}")
        return 1
    bindir, build_s, built = build_tools()
    say(f"control plane binaries: {bindir} ({'built' if built else 'cached'}, {build_s:.0f} s)")
    selected = [c for c in cases() if not args.overlay or c.overlay in args.overlay]
    work = Path(tempfile.mkdtemp(prefix="onpolicy-deploy-check-"))
    # SIGTERM/SIGHUP end the run like Ctrl-C, so the finally blocks stop every process.
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.default_int_handler)
    results = []
    try:
        for case in selected:
            case_dir = work / case.overlay
            case_dir.mkdir()
            result = run_case(case, bindir, etcd, case_dir, args.wait)
            results.append(result)
            say(
                f"{case.overlay}: accepted {result['accepted']}/{result['objects']}, pods "
                f"{result['pods_scheduled']}/{result['pods_total']}, claims "
                f"{result['claims_bound']}/{result['claims_total']}, misplaced "
                f"{len(result['misplaced_objects'])}, second apply changed "
                f"{len(result['second_apply']['changed'])}, Kafka brokers on "
                f"{result['kafka_brokers']['nodes']} nodes / {result['kafka_brokers']['zones']} "
                f"zones ({result['case_s']} s)"
            )
            for failure in result["failures"]:
                say(f"  FAIL {failure}")
    finally:
        if args.keep:
            say(f"logs and data kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    version = json.loads(
        subprocess.run(
            [str(bindir / "kubectl"), "version", "--client", "-o", "json"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )["clientVersion"]["gitVersion"]
    etcd_version = subprocess.run([etcd, "--version"], capture_output=True, text=True).stdout
    report = {
        "kubernetes": version,
        "etcd": etcd_version.splitlines()[0].split()[-1] if etcd_version else None,
        "build_s": round(build_s, 1),
        "built_this_run": built,
        # The build that filled the cache (build-k8s.sh records it; null for older caches).
        "first_build_s": _first_build_s(bindir),
        "check_s": round(time.monotonic() - started - build_s, 1),
        "ok": all(not r["failures"] for r in results),
        "cases": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    say(f"{'ok' if report['ok'] else 'FAILED'}: wrote {args.out} ({report['check_s']} s)")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
