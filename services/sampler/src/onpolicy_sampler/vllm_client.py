"""Async client for the vLLM OpenAI-compatible server: sampling with token ids.

Adapters are loaded by :class:`onpolicy_sampler.policy.PolicyTracker`, not here.

Errors are mapped onto the bus's classes: vLLM unreachable or answering 5xx is a
:class:`TransientError` (retry, commit nothing); 401 and 403 (a server started with
``--api-key`` refusing ``vllm_api_key``) and a 404 that is not about a model (a wrong
``vllm_url``) are a :class:`VllmRejected`, a ``ConfigurationError``: every prompt would fail
alike, so the processor pauses consumption and reports not ready, dead-lettering nothing, until
a probe gets through; a 400 (prompt too long, bad parameters) is an :class:`InvalidRecord`
(dead letter with vLLM's own message).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import httpx

from onpolicy.bus import ConfigurationError, TransientError
from onpolicy.serde import InvalidRecord


class ModelNotLoaded(TransientError):
    """vLLM does not know the adapter (e.g. it restarted): reload it, then retry."""


class VllmRejected(ConfigurationError):
    """vLLM refuses every request as configured: the API key, or the URL."""


_REJECTED_HINTS = {
    401: "vLLM rejected the API key (vllm_api_key, ONPOLICY_SAMPLER_VLLM_API_KEY: missing or "
    "not the server's --api-key)",
    403: "vLLM refused the API key (vllm_api_key, ONPOLICY_SAMPLER_VLLM_API_KEY)",
    404: "no such route on vLLM: is vllm_url ({url}) the server's root, without /v1?",
}


@dataclass
class Sample:
    text: str
    num_tokens: int
    finish_reason: str
    token_ids: list[int] = field(default_factory=list)
    # vLLM's stop_reason: the stop token id or stop string that ended a "stop" (None: EOS).
    stop_reason: int | str | None = None


@dataclass
class SampleResult:
    samples: list[Sample]
    prompt_tokens: int
    prompt_token_ids: list[int] = field(default_factory=list)


def _detail(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:500]
    if isinstance(body, dict):
        err = body.get("error", body)
        if isinstance(err, dict):
            return str(err.get("message") or err)[:500]
        return str(err)[:500]
    return str(body)[:500]


class VllmClient:
    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        timeout_s: float = 600.0,
        max_connections: int = 256,
        transport: httpx.AsyncBaseTransport | None = None,  # tests: httpx.MockTransport
    ):
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.base_url = base_url.rstrip("/")
        self.http = httpx.AsyncClient(
            base_url=self.base_url,
            headers=headers,
            timeout=httpx.Timeout(timeout_s, connect=10.0),
            transport=transport,
            limits=httpx.Limits(
                max_connections=max_connections, max_keepalive_connections=max_connections
            ),
        )

    async def aclose(self) -> None:
        await self.http.aclose()

    async def _post(self, path: str, payload: dict[str, Any], model: str) -> dict[str, Any]:
        try:
            response = await self.http.post(path, json=payload)
        except httpx.TransportError as exc:
            raise TransientError(f"vLLM unreachable at {self.base_url}: {exc!r}") from exc
        if response.status_code == 404 and "does not exist" in response.text:
            raise ModelNotLoaded(f"vLLM does not serve {model!r}: {_detail(response)}")
        if response.status_code in _REJECTED_HINTS:
            hint = _REJECTED_HINTS[response.status_code].format(url=self.base_url)
            raise VllmRejected(
                f"{hint}; {path} answered {response.status_code}: {_detail(response)}"
            )
        if response.status_code >= 500 or response.status_code == 429:
            raise TransientError(f"vLLM answered {response.status_code}: {_detail(response)}")
        if response.status_code >= 400:
            raise InvalidRecord(
                f"vLLM rejected the prompt ({response.status_code}): {_detail(response)}"
            )
        return response.json()

    async def sample(
        self,
        *,
        model: str,
        params: dict[str, Any],
        n: int,
        messages: list[dict[str, str]] | None = None,
        prompt: str | None = None,
    ) -> SampleResult:
        """One request with ``n`` choices, so the prompt's prefix is computed once."""
        payload: dict[str, Any] = {"model": model, "n": n, **params, "return_token_ids": True}
        if messages is not None:
            payload["messages"] = messages
            body = await self._post("/v1/chat/completions", payload, model)
        else:
            payload["prompt"] = prompt
            body = await self._post("/v1/completions", payload, model)
        samples = []
        for choice in sorted(body["choices"], key=lambda c: c["index"]):
            text = choice["message"]["content"] if messages is not None else choice["text"]
            token_ids = list(choice.get("token_ids") or [])
            samples.append(
                Sample(
                    text=text or "",
                    num_tokens=len(token_ids),
                    finish_reason=choice.get("finish_reason") or "",
                    token_ids=token_ids,
                    stop_reason=choice.get("stop_reason"),
                )
            )
        if samples and all(s.num_tokens == 0 for s in samples):
            # Servers without return_token_ids: spread the usage count over the choices.
            total = (body.get("usage") or {}).get("completion_tokens", 0)
            for s in samples:
                s.num_tokens = total // len(samples)
        # Chat answers carry the prompt's ids at the top level, completions per choice.
        prompt_ids = body.get("prompt_token_ids")
        if prompt_ids is None and body.get("choices"):
            prompt_ids = body["choices"][0].get("prompt_token_ids")
        return SampleResult(
            samples,
            (body.get("usage") or {}).get("prompt_tokens", 0),
            list(prompt_ids or []),
        )

    async def models(self) -> list[str]:
        response = await self.http.get("/v1/models")
        response.raise_for_status()
        return [m["id"] for m in response.json()["data"]]
