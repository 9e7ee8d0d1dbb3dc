"""The merged hand-off on the sampler's side: full weights reloaded in place, proven by label.

In ``handoff: merged`` vLLM runs without LoRA and with ``VLLM_SERVER_DEV_MODE=1``; each policy
is a full model folder (the trainer's merged weights, or a full fine-tune) that the server
loads over its current weights:

- ``POST /collective_rpc {"method": "reload_weights", "kwargs": {"weights_path": DIR}}``;
- ``POST /reset_prefix_cache``: cached KV blocks were computed by the old weights;
- ``POST /update_weight_version {"new_version": LABEL}``, then ``GET /weight_info`` must
  answer that label. vLLM keeps the label in its engine and answers ``"default"`` after a
  restart (when it serves the checkpoint it was started with, the base model), so the label
  is how the worker proves which policy produced each group (``WeightGate``).

Requests must not straddle a reload (a group would mix two policies' tokens), so the worker's
requests pass through :class:`WeightGate`: a reload closes it, waits for the requests in
flight, swaps, and opens it again. A reload that failed leaves the weights unknown: the label
is set to ``UNKNOWN`` and the gate stays closed until some version reloads.
"""

from __future__ import annotations

import asyncio
import hashlib
import threading
from collections.abc import Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import httpx

from onpolicy.bus import TransientError
from onpolicy_sampler.adapters import permanent, transient
from onpolicy_sampler.served import _detail

# vLLM's label for the weights it was started with (vllm/v1/engine/core.py) and ours for the
# base model reloaded over a policy; both mean version 0.
VLLM_DEFAULT = "default"
BASE_LABEL = "base"
UNKNOWN = "unknown"


def weights_label(version: int, uri: str, created_unix_ms: int, prefix: str = "policy") -> str:
    """``<prefix>-v<N>-<digest>``: the digest of the folder's URI and the update's time, so two
    runs (or two lineages) publishing the same version never share a label."""
    digest = hashlib.sha256(f"{uri}\0{created_unix_ms}".encode()).hexdigest()[:10]
    return f"{prefix}-v{version}-{digest}"


def label_version(label: str) -> int | None:
    """The policy version a label names (0 for the base model; None: unknown)."""
    if label in (VLLM_DEFAULT, BASE_LABEL):
        return 0
    _, sep, rest = label.rpartition("-v")
    number = rest.split("-", 1)[0]
    return int(number) if sep and number.isdigit() else None


async def served_label(http: httpx.AsyncClient) -> str:
    """vLLM's weight label, read by the worker after each request."""
    try:
        response = await http.get("/weight_info", timeout=10)
    except httpx.TransportError as exc:
        raise TransientError(f"vLLM unreachable (/weight_info): {exc!r}") from exc
    if response.status_code != 200:
        raise TransientError(
            f"/weight_info answered {response.status_code}: is VLLM_SERVER_DEV_MODE=1 set?"
        )
    return str(response.json().get("weight_version"))


class ServedWeights:
    """vLLM's dev-mode weight API for one sampler (callers serialize calls)."""

    def __init__(self, http: httpx.Client, reload_timeout_s: float = 300.0):
        self.http = http
        self.reload_timeout_s = reload_timeout_s

    def _post(self, path: str, what: str, **kw: Any) -> httpx.Response:
        try:
            response = self.http.post(path, **kw)
        except httpx.HTTPError as exc:
            raise transient("vllm_unavailable", f"vLLM unreachable ({path}): {exc!r}") from exc
        if response.status_code == 404:
            raise permanent(
                "no_dev_mode",
                f"vLLM has no {path}: start it with VLLM_SERVER_DEV_MODE=1 for handoff=merged",
            )
        if response.status_code >= 500 and path == "/collective_rpc" and self._healthy():
            # vLLM 0.32 answers 500 when its worker cannot load the folder (a missing or
            # truncated file) and stays up: the folder's fault, not a reason to retry.
            raise permanent(
                what,
                f"vLLM could not reload the weights ({response.status_code}): {_detail(response)}",
            )
        if response.status_code >= 400:
            raise transient(what, f"{path} answered {response.status_code}: {_detail(response)}")
        return response

    def _healthy(self) -> bool:
        try:
            return self.http.get("/health", timeout=5).status_code == 200
        except httpx.HTTPError:
            return False

    def label(self) -> str:
        try:
            response = self.http.get("/weight_info", timeout=10)
        except httpx.HTTPError as exc:
            raise transient(
                "vllm_unavailable", f"vLLM unreachable (/weight_info): {exc!r}"
            ) from exc
        if response.status_code == 404:
            raise permanent(
                "no_dev_mode",
                "vLLM has no /weight_info: start it with VLLM_SERVER_DEV_MODE=1 for handoff=merged",
            )
        if response.status_code != 200:
            raise transient("vllm_unavailable", f"/weight_info answered {response.status_code}")
        return str(response.json().get("weight_version"))

    def set_label(self, label: str) -> None:
        self._post("/update_weight_version", "verify", json={"new_version": label})

    def reload(self, path: str, label: str) -> None:
        """Load the model folder at ``path`` (as vLLM sees it) and label it ``label``.

        Marks the weights ``UNKNOWN`` first, so a reload that fails half-way is never taken
        for the old policy. A folder vLLM cannot load is a permanent ``reload`` failure; vLLM
        unreachable or unhealthy a transient one.
        """
        self.set_label(UNKNOWN)
        self._post(
            "/collective_rpc",
            "reload",
            json={"method": "reload_weights", "kwargs": {"weights_path": path}},
            timeout=self.reload_timeout_s,
        )
        self._post("/reset_prefix_cache", "reload")
        self.set_label(label)
        served = self.label()
        if served != label:
            raise transient("verify", f"after the reload vLLM reports {served!r}, not {label!r}")


class WeightGate:
    """Requests in flight versus weight reloads: a reload waits for the requests to finish,
    and new requests wait for the reload (async side: the worker; thread side: the tracker)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._inflight = 0
        self._closed = False

    @property
    def closed(self) -> bool:
        return self._closed

    @asynccontextmanager
    async def request(self):
        while True:
            with self._cond:
                if not self._closed:
                    self._inflight += 1
                    break
            await asyncio.sleep(0.05)
        try:
            yield
        finally:
            with self._cond:
                self._inflight -= 1
                self._cond.notify_all()

    def close(self, timeout_s: float | None = None) -> bool:
        """Stop new requests and wait for those in flight; False if they did not finish."""
        with self._cond:
            self._closed = True
            return self._cond.wait_for(lambda: self._inflight == 0, timeout_s)

    def open(self) -> None:
        with self._cond:
            self._closed = False

    @contextmanager
    def swap(self, timeout_s: float | None = None) -> Iterator[None]:
        """Closed (and drained) inside; reopened only if the body succeeds."""
        if not self.close(timeout_s):
            self.open()
            raise transient("drain", f"requests still in flight after {timeout_s}s")
        yield
        self.open()
