"""Secrets never go to files: settings are written redacted, and mode 0600.

``onpolicy run`` writes each lineage's ``config.yaml`` and the run's ``settings.json`` into the
run folder. The secrets among those settings (SASL passwords, API keys, tokens) are taken out
of what is written and handed to the services as environment variables instead, the way a
Kubernetes Secret reaches a pod; the services read them with the usual precedence
(environment over the YAML file).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from pydantic import SecretStr

REDACTED = "**********"  # what pydantic prints for a SecretStr

# Setting names that hold a secret value (not a file or variable naming where one is).
_SECRET_NAME = re.compile(r"(^|_)(password|passwd|api_key|apikey|token|secret|credentials?)$", re.I)


def is_secret_name(name: str) -> bool:
    return bool(_SECRET_NAME.search(str(name)))


def _value(value: Any) -> Any:
    return value.get_secret_value() if isinstance(value, SecretStr) else value


def split_secrets(data: Any, env_prefix: str) -> tuple[Any, dict[str, str]]:
    """``data`` without its secrets, and the environment variables that carry them.

    ``{"llm": {"api_key": "k"}}`` with prefix ``ONPOLICY_JUDGE_`` gives ``{"llm": {}}`` and
    ``{"ONPOLICY_JUDGE_LLM__API_KEY": "k"}`` (pydantic-settings' nested delimiter ``__``).
    """
    env: dict[str, str] = {}

    def walk(node: Any, path: tuple[str, ...]) -> Any:
        if not isinstance(node, dict):
            return node
        out = {}
        for key, value in node.items():
            value = _value(value)
            if is_secret_name(key) and isinstance(value, str):
                if value and value != REDACTED:
                    env[env_prefix + "__".join((*path, str(key))).upper()] = value
                continue
            out[key] = walk(value, (*path, str(key)))
        return out

    return walk(data, ()), env


def redact(data: Any) -> Any:
    """A copy of ``data`` (dicts, lists) with every secret-named string replaced by ``REDACTED``."""
    if isinstance(data, SecretStr):
        return REDACTED
    if isinstance(data, dict):
        out = {}
        for key, value in data.items():
            secret = is_secret_name(key) and isinstance(_value(value), str) and _value(value)
            out[key] = REDACTED if secret else redact(value)
        return out
    if isinstance(data, list | tuple):
        return [redact(v) for v in data]
    return data


def write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` readable by its owner only (0600, also when it existed)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)
    with os.fdopen(fd, "w") as file:
        file.write(text)


def open_private(path: Path, mode: str = "ab"):
    """``open(path, mode)`` creating the file 0600 (logs of services that hold secrets)."""
    flags = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if "a" in mode else os.O_TRUNC)
    fd = os.open(path, flags, 0o600)
    os.fchmod(fd, 0o600)
    return os.fdopen(fd, mode)
