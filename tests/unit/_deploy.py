"""Shared helpers of the tests/unit/test_deploy_*.py files (deploy/ validated offline)."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from functools import cache
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

REPO = Path(__file__).resolve().parents[2]


def _load_deploycheck():
    spec = importlib.util.spec_from_file_location(
        "deploycheck", REPO / "deploy" / "tools" / "deploycheck.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["deploycheck"] = module
    spec.loader.exec_module(module)
    return module


dc = _load_deploycheck()

SETTINGS = {
    "sampler": ("onpolicy_sampler.settings", "SamplerSettings"),
    "judge": ("onpolicy_judge.settings", "JudgeSettings"),
    "trainer": ("onpolicy_trainer.settings", "TrainerSettings"),
}


def tools_or_fail() -> None:
    """Fail (not skip) without the cached tools: a skipped check would pass CI silently."""
    try:
        dc.kustomize_bin()
        dc.crd_schemas()
        dc.schema_dir("compose-spec", "COMPOSE_GO_VERSION")
    except dc.ToolsMissing as exc:
        pytest.fail(str(exc), pytrace=False)


@cache
def built(overlay: str) -> tuple[dict[str, Any], ...]:
    # "examples/<name>": a variant kept beside the overlays (not on the control-plane check).
    if overlay == "base" or "/" in overlay:
        path = dc.K8S / overlay
    else:
        path = dc.K8S / "overlays" / overlay
    return tuple(dc.kustomize_build(path))


def settings_class(service: str) -> type:
    module, name = SETTINGS[service]
    return getattr(importlib.import_module(module), name)


def _field(model: type[BaseModel], name: str):
    for field_name, info in model.model_fields.items():
        if name in (field_name, info.alias):
            return info
    return None


def unknown_env(service: str, env: dict[str, str]) -> list[str]:
    """ONPOLICY_* variables that name no settings field (pydantic-settings ignores those)."""
    from onpolicy.settings import SHARED_SECTIONS

    cls = settings_class(service)
    unknown = []
    for var in env:
        if not var.startswith("ONPOLICY_") or var == "ONPOLICY_CONFIG":
            continue
        own = f"ONPOLICY_{service.upper()}_"
        rest = var[len(own) :] if var.startswith(own) else var[len("ONPOLICY_") :]
        parts = rest.lower().split("__")
        if not var.startswith(own) and parts[0] not in SHARED_SECTIONS:
            unknown.append(var)
            continue
        model: Any = cls
        for part in parts:
            info = _field(model, part) if isinstance(model, type) else None
            if info is None:
                unknown.append(var)
                break
            model = info.annotation
    return unknown


def load_service_settings(
    service: str, env: dict[str, str], config: Path | None, monkeypatch: pytest.MonkeyPatch
):
    """The service's settings from exactly ``env`` (and the config file), as it would start."""
    from onpolicy.settings import load_settings

    for var in list(__import__("os").environ):
        if var.startswith("ONPOLICY_"):
            monkeypatch.delenv(var)
    for var, value in env.items():
        # The file the pod mounts at ONPOLICY_CONFIG is passed here as ``config``.
        if var != "ONPOLICY_CONFIG":
            monkeypatch.setenv(var, value)
    return load_settings(settings_class(service), config_file=config)
