"""The sampler's vLLM errors by class, at httpx's transport (what vLLM 0.32 answers for each):
a refused API key or a wrong URL pauses the sampler (ConfigurationError), a bad prompt is
dead-lettered (InvalidRecord), an overloaded or failing server is retried (TransientError)."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from onpolicy.bus import ConfigurationError, TransientError
from onpolicy.serde import InvalidRecord
from onpolicy_sampler.vllm_client import ModelNotLoaded, VllmClient, VllmRejected

KEY = "the-servers-key"
ANSWER = {
    "choices": [
        {"index": 0, "message": {"content": "Paris."}, "finish_reason": "stop", "token_ids": [1]}
    ],
    "usage": {"prompt_tokens": 5, "completion_tokens": 1},
}


def vllm(request: httpx.Request) -> httpx.Response:
    """A server started with --api-key KEY: vLLM's 401 body for any other key."""
    if request.headers.get("authorization") != f"Bearer {KEY}":
        return httpx.Response(401, json={"error": "Unauthorized"})
    if request.url.path != "/v1/chat/completions":
        return httpx.Response(404, json={"detail": "Not Found"})
    return httpx.Response(200, json=ANSWER)


def sample(api_key: str | None, url: str = "http://vllm", handler=vllm):
    client = VllmClient(url, api_key, transport=httpx.MockTransport(handler))

    async def go():
        try:
            return await client.sample(
                model="m", params={}, n=1, messages=[{"role": "user", "content": "Capital?"}]
            )
        finally:
            await client.aclose()

    return asyncio.run(go())


def test_the_right_key_samples() -> None:
    assert sample(KEY).samples[0].text == "Paris."


@pytest.mark.parametrize("api_key", [None, "wrong"])
def test_a_refused_key_is_a_configuration_error_naming_the_setting(api_key) -> None:
    with pytest.raises(VllmRejected) as info:
        sample(api_key)
    assert isinstance(info.value, ConfigurationError)
    assert not isinstance(info.value, TransientError | InvalidRecord)
    assert "vllm_api_key" in str(info.value) and "401" in str(info.value)
    assert KEY not in str(info.value) and "wrong" not in str(info.value)


def test_403_and_a_wrong_url_are_configuration_errors_too() -> None:
    forbidden = lambda request: httpx.Response(403, json={"error": "Forbidden"})  # noqa: E731
    with pytest.raises(VllmRejected, match="403"):
        sample(KEY, handler=forbidden)
    with pytest.raises(VllmRejected, match=r"vllm_url \(http://vllm/v1\)"):
        sample(KEY, url="http://vllm/v1")  # /v1/v1/chat/completions: vLLM's 404 Not Found


def test_other_answers_keep_their_classes() -> None:
    def answer(status: int, body: dict):
        return lambda request: httpx.Response(status, json=body)

    missing = {"error": {"message": "The model `policy-v3` does not exist."}}
    with pytest.raises(ModelNotLoaded):  # an adapter vLLM lost: reload it, retry
        sample(KEY, handler=answer(404, missing))
    with pytest.raises(InvalidRecord, match="too long"):  # this prompt: dead letter
        sample(KEY, handler=answer(400, {"error": {"message": "prompt too long"}}))
    for status in (429, 500, 503):
        with pytest.raises(TransientError):
            sample(KEY, handler=answer(status, {"error": {"message": "busy"}}))
    for error in (TransientError, InvalidRecord):
        assert not issubclass(error, ConfigurationError)
