"""What vLLM serves, checked rather than assumed: its LoRA API and ``/v1/models``.

vLLM 0.32 answers ``/v1/load_lora_adapter`` with 400 "has already been loaded" for any name it
knows, whatever the path, so that answer proves nothing. An adapter counts as served only
when ``/v1/models`` lists its name with ``root`` equal to the path the sampler gave; a name
listed with another root is unloaded and loaded again.
"""

from __future__ import annotations

import logging
from typing import Any

import httpx

from onpolicy_sampler.adapters import permanent, transient

log = logging.getLogger(__name__)


def _detail(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:300]
    if isinstance(body, dict):
        err = body.get("error", body)
        if isinstance(err, dict):
            return str(err.get("message") or err)[:300]
        return str(err)[:300]
    return str(body)[:300]


class ServedModels:
    """vLLM's LoRA API for one sampler (one ``httpx.Client``; callers serialize calls)."""

    def __init__(self, http: httpx.Client):
        self.http = http

    def _call(
        self, method: str, path: str, *, server_errors: bool = True, **kw: Any
    ) -> httpx.Response:
        """One request; unreachable, 429, 503 (and other 5xx unless ``server_errors`` is
        False) are transient failures."""
        try:
            response = self.http.request(method, path, **kw)
        except httpx.HTTPError as exc:
            raise transient("vllm_unavailable", f"vLLM unreachable ({path}): {exc!r}") from exc
        status = response.status_code
        if status in (429, 503) or (server_errors and status >= 500):
            raise transient(
                "vllm_unavailable",
                f"vLLM answered {response.status_code} on {path}: {_detail(response)}",
            )
        return response

    def healthy(self) -> bool:
        try:
            return self.http.get("/health", timeout=5).status_code == 200
        except httpx.HTTPError:
            return False

    def models(self) -> dict[str, dict[str, Any]]:
        """``/v1/models`` by id: the base model and every adapter, each with its ``root``."""
        response = self._call("GET", "/v1/models")
        if response.status_code != 200:
            raise transient(
                "vllm_unavailable",
                f"/v1/models answered {response.status_code}: {_detail(response)}",
            )
        return {entry["id"]: entry for entry in response.json().get("data", [])}

    def serves(self, name: str, path: str) -> bool:
        entry = self.models().get(name)
        return entry is not None and entry.get("root") == path

    def unload(self, name: str) -> None:
        response = self._call("POST", "/v1/unload_lora_adapter", json={"lora_name": name})
        if response.status_code >= 400 and response.status_code != 404:
            text = response.text.lower()
            if "not found" not in text and "does not exist" not in text:
                raise transient(
                    "unload",
                    f"vLLM did not unload {name} ({response.status_code}): {_detail(response)}",
                )

    def ensure(self, name: str, path: str) -> str:
        """Make ``name`` serve the adapter at ``path``, proven by ``/v1/models``.

        Returns what was done: "verified" (already served from ``path``), "loaded" or
        "reloaded" (the name was served from another root). Raises a permanent
        :class:`LoadFailure` when vLLM refuses the adapter, a transient one otherwise.
        """
        entry = self.models().get(name)
        if entry is not None and entry.get("root") == path:
            return "verified"
        action = "loaded"
        if entry is not None:
            log.warning(
                "vLLM serves %s from %s, not %s: unloading it and loading ours",
                name,
                entry.get("root"),
                path,
            )
            self.unload(name)
            action = "reloaded"
        response = self._call(
            "POST",
            "/v1/load_lora_adapter",
            server_errors=False,
            json={"lora_name": name, "lora_path": path},
        )
        if response.status_code >= 500:
            # vLLM 0.32 answers 500 when its engine rejects the adapter (e.g. "LoRA rank 32 is
            # greater than max_lora_rank 16"): the adapter's fault while the server is healthy.
            if not self.healthy():
                raise transient(
                    "vllm_unavailable",
                    f"loading {name} answered {response.status_code} and vLLM is not healthy: "
                    f"{_detail(response)}",
                )
            raise permanent(
                "vllm_refused",
                f"vLLM refused adapter {name} from {path} "
                f"({response.status_code}): {_detail(response)}",
            )
        if response.status_code >= 400:
            already = "already" in response.text.lower()
            if not already:
                raise permanent(
                    "vllm_refused",
                    f"vLLM refused adapter {name} from {path} "
                    f"({response.status_code}): {_detail(response)}",
                )
            # Someone loaded the name between our look and our load: only its root tells.
        entry = self.models().get(name)
        root = entry.get("root") if entry else None
        if root != path:
            raise transient(
                "verify",
                f"after loading, vLLM's /v1/models lists {name} with root {root!r}, not {path!r}",
            )
        return action
