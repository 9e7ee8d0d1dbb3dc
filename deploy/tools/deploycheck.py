"""Offline validation of deploy/: Kustomize builds, Kubernetes and CRD schemas, compose-spec.

Used by tests/unit/test_deploy_*.py and runnable by hand (``python deploy/tools/deploycheck.py``)
after ``deploy/tools/install.sh`` has fetched the pinned tools and schemas (versions.env).
CRD schemas are the projects' own openAPIV3Schemas turned into JSON Schema, strict like the
API server's field validation: an object's unknown field is an error, not silently pruned.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import yaml

TOOLS_DIR = Path(__file__).resolve().parent
DEPLOY = TOOLS_DIR.parent
REPO = DEPLOY.parent
K8S = DEPLOY / "k8s"
OVERLAYS = ("dev", "gpu")
# API groups whose objects validate against CRD schemas; everything else is core Kubernetes.
CRD_GROUPS = ("kafka.strimzi.io", "keda.sh", "monitoring.coreos.com")


class ToolsMissing(RuntimeError):
    """The pinned tools or schemas are not cached: run deploy/tools/install.sh."""


@cache
def versions() -> dict[str, str]:
    pins: dict[str, str] = {}
    for line in (TOOLS_DIR / "versions.env").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            pins[key.strip()] = value.strip()
    return pins


def cache_dir() -> Path:
    default = Path.home() / ".cache" / "onpolicy" / "tools"
    return Path(os.environ.get("ONPOLICY_TOOLS_DIR", default))


def _need(path: Path) -> Path:
    if not path.exists():
        raise ToolsMissing(f"{path} is missing: run deploy/tools/install.sh first")
    return path


def kustomize_bin() -> Path:
    return _need(cache_dir() / "bin" / f"kustomize-{versions()['KUSTOMIZE_VERSION']}")


def schema_dir(name: str, version_key: str) -> Path:
    return _need(cache_dir() / "schemas" / f"{name}-{versions()[version_key]}")


def kubernetes_versions() -> list[str]:
    return versions()["KUBERNETES_VERSIONS"].split(",")


def kustomize_build(path: Path) -> list[dict[str, Any]]:
    """The objects ``kustomize build path`` renders."""
    result = subprocess.run(
        [str(kustomize_bin()), "build", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(f"kustomize build {path} failed:\n{result.stderr}")
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


# ------------------------------------------------------------------ CRD schemas
def _json_schema(node: Any) -> Any:
    """One openAPIV3Schema node as JSON Schema (draft 7), strict about unknown fields."""
    if not isinstance(node, dict):
        return node
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in ("properties", "patternProperties"):
            out[key] = {name: _json_schema(sub) for name, sub in value.items()}
        elif key in ("items", "additionalProperties", "not") and isinstance(value, dict):
            out[key] = _json_schema(value)
        elif key in ("allOf", "anyOf", "oneOf"):
            out[key] = [_json_schema(sub) for sub in value]
        elif key.startswith("x-kubernetes-") or key in ("nullable", "description", "example"):
            continue
        else:
            out[key] = value
    if node.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out.setdefault("allOf", []).append({"type": ["integer", "string"]})
    if node.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"] if isinstance(out["type"], str) else out["type"]
    if (
        node.get("type") == "object"
        and "properties" in node
        and "additionalProperties" not in node
        and not node.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


def _crd_files() -> Iterator[Path]:
    for name, key in (
        ("strimzi", "STRIMZI_VERSION"),
        ("keda", "KEDA_VERSION"),
        ("prometheus-operator", "PROMETHEUS_OPERATOR_VERSION"),
    ):
        yield from sorted(schema_dir(name, key).glob("*.yaml"))


@cache
def crd_schemas() -> dict[tuple[str, str], dict[str, Any]]:
    """JSON Schema per (apiVersion, kind) of every served version of the cached CRDs."""
    schemas: dict[tuple[str, str], dict[str, Any]] = {}
    for path in _crd_files():
        for crd in yaml.safe_load_all(path.read_text()):
            if not crd or crd.get("kind") != "CustomResourceDefinition":
                continue
            group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
            for version in crd["spec"]["versions"]:
                if version.get("served", True):
                    schema = _json_schema(version["schema"]["openAPIV3Schema"])
                    schemas[(f"{group}/{version['name']}", kind)] = schema
    return schemas


def is_custom(obj: dict[str, Any]) -> bool:
    return obj.get("apiVersion", "").split("/")[0] in CRD_GROUPS


def validate_object(obj: dict[str, Any]) -> list[str]:
    """Schema errors of one object (empty when it validates)."""
    name = f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}"
    if is_custom(obj):
        schema = crd_schemas().get((obj["apiVersion"], obj["kind"]))
        if schema is None:
            return [f"{name}: no CRD schema for {obj['apiVersion']} {obj['kind']}"]
        validator = jsonschema.Draft7Validator(schema)
        return [
            f"{name}: {'/'.join(map(str, err.absolute_path))}: {err.message}"
            for err in validator.iter_errors(obj)
        ]
    errors = []
    for version in kubernetes_versions():
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            path = "/".join(map(str, exc.path))
            errors.append(f"{name} (Kubernetes {version}): {path}: {exc.message}")
        except kubernetes_validate.SchemaNotFoundError as exc:
            errors.append(f"{name} (Kubernetes {version}): no schema: {exc}")
    return errors


# ------------------------------------------------------------------ compose
def compose_file() -> dict[str, Any]:
    return yaml.safe_load((REPO / "docker-compose.yml").read_text())


def compose_errors(doc: dict[str, Any] | None = None) -> list[str]:
    path = schema_dir("compose-spec", "COMPOSE_GO_VERSION") / "compose-spec.json"
    schema = json.loads(path.read_text())
    validator = jsonschema.validators.validator_for(schema)(schema)
    return [
        f"{'/'.join(map(str, err.absolute_path))}: {err.message}"
        for err in validator.iter_errors(compose_file() if doc is None else doc)
    ]


_DEFAULT = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::?-([^}]*))?\}")


def interpolate(value: str, env: dict[str, str] | None = None) -> str:
    """Compose's ${VAR}, ${VAR:-default} with ``env`` (default: nothing set)."""
    env = env or {}
    return _DEFAULT.sub(lambda m: env.get(m.group(1)) or (m.group(2) or ""), value)


# ------------------------------------------------------------------ Grafana / PromQL
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "onpolicy.json"
METRICS_LIST = DEPLOY / "grafana" / "metrics.txt"
_PROMQL_WORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or",
    "unless", "offset", "inf", "nan",
}  # fmt: skip


def listed_metrics() -> list[str]:
    lines = METRICS_LIST.read_text().splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.startswith("#")]


def dashboard_queries(dashboard: dict[str, Any]) -> list[str]:
    """Every PromQL expression of the dashboard: panel targets and query variables."""
    exprs = []

    def walk(panels: list[dict[str, Any]]) -> None:
        for panel in panels:
            exprs.extend(t["expr"] for t in panel.get("targets", []) if t.get("expr"))
            walk(panel.get("panels", []))

    walk(dashboard.get("panels", []))
    for var in dashboard.get("templating", {}).get("list", []):
        query = var.get("query")
        if var.get("type") == "query":
            text = query.get("query", "") if isinstance(query, dict) else query
            # label_values(metric, label) names a metric too.
            m = re.match(r"\s*label_values\(\s*([A-Za-z_:][A-Za-z0-9_:]*)\s*,", text or "")
            exprs.append(m.group(1) if m else text)
    return exprs


def promql_metrics(expr: str) -> set[str]:
    """Metric names an expression selects (histogram series folded to their base name)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # label values, regexes
    text = re.sub(r"\{[^}]*\}", "", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", "", text)  # ranges
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text)
    text = re.sub(r"\$\{?\w+\}?", "", text)  # Grafana variables ($__rate_interval)
    names = set()
    for m in re.finditer(r"(?<![\w:.])([A-Za-z_:][A-Za-z0-9_:]*)(?![\w:])\s*(\()?", text):
        name, call = m.group(1), m.group(2)
        if call or name.lower() in _PROMQL_WORDS:
            continue
        names.add(re.sub(r"_(bucket|sum|count)$", "", name))
    return names


def main() -> int:
    failures: list[str] = []
    for overlay in ("base", *OVERLAYS):
        path = K8S / "base" if overlay == "base" else K8S / "overlays" / overlay
        objects = kustomize_build(path)
        errors = [e for obj in objects for e in validate_object(obj)]
        print(f"k8s {overlay}: {len(objects)} objects, {len(errors)} schema errors")
        failures += errors
    errors = compose_errors()
    print(f"docker-compose.yml: {len(errors)} schema errors")
    failures += errors
    dashboard = json.loads(DASHBOARD.read_text())
    used = set().union(*(promql_metrics(q) for q in dashboard_queries(dashboard)))
    unlisted = sorted(used - set(listed_metrics()))
    print(f"dashboard: {len(used)} metrics, unlisted: {unlisted or 'none'}")
    failures += unlisted
    for failure in failures:
        print("  " + failure)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
