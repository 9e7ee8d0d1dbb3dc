"""LLM-as-judge backend over any OpenAI-compatible chat endpoint (vLLM, HF router, OpenAI).

One request per group shows the instruction and every response (in a shuffled order, mapped
back afterwards, against position bias) and asks for a 1-5 score and a short rationale per
response as JSON, UltraFeedback style. Answers that cannot be parsed are asked again (with a
new order), then the group is dead-lettered (:class:`JudgeParseError`).

HTTP errors, by what operators expect of each:

- 401, 403, 404 (a rejected or expired API key, no access to the model, a wrong model name or
  base URL): every group would fail alike, so :class:`JudgeRejected` (a ``ConfigurationError``)
  makes the processor pause consumption and report not ready, nothing dead-lettered; a group
  is retried as a probe now and then, and consumption resumes when it gets through (with
  ``api_key_file``, the file is read again after a rejection: a rotated Secret is picked up).
- 429 and 5xx are retried here with exponential backoff honouring ``Retry-After``; a request
  that keeps failing raises :class:`JudgeUnavailable` (a ``TransientError``): retried by the
  processor, whose circuit breaker stops calling a server failing every request, and a group
  failing alone is dead-lettered after ``max_transient_attempts``.
- Other 4xx (400: this group's request is bad) and timeouts raise :class:`JudgeApiError`:
  retried, then dead-lettered (``max_attempts``).
- A server that cannot be reached raises ``TransientError`` (retried; the breaker opens).

The API token comes from the settings, a secret file or the environment and is never logged.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import logging
import os
import random
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import httpx

from onpolicy import ids
from onpolicy import messages as m
from onpolicy.bus import ConfigurationError, TransientError
from onpolicy.serde import RecordError
from onpolicy_judge.backend import BackendScores
from onpolicy_judge.chat import instruction_text
from onpolicy_judge.metrics import JudgeMetrics
from onpolicy_judge.settings import DEFAULT_LLM_TEMPLATE, LlmJudgeSettings

log = logging.getLogger(__name__)

Sleep = Callable[[float], Awaitable[None]]


class JudgeParseError(RecordError):
    """The judge never gave a usable answer for this group: dead-letter it with the reason."""

    kind = "parse"


class JudgeApiError(Exception):
    """The endpoint kept failing (or refused the request); the processor retries the group."""

    def __init__(self, status: int, message: str):
        # status 0: no HTTP answer (timeout, connection cut mid-request)
        super().__init__(f"judge endpoint returned HTTP {status}: {message}" if status else message)
        self.status = status


class JudgeUnavailable(JudgeApiError, TransientError):
    """429 or 5xx after every HTTP retry: the server is overloaded or failing."""


class JudgeRejected(JudgeApiError, ConfigurationError):
    """401, 403 or 404: the endpoint refuses requests as configured (key, model, URL)."""


_REJECTED_HINTS = {
    401: "the API key was rejected (missing, expired or wrong: llm.api_key, llm.api_key_file "
    "or the variable llm.api_key_env names)",
    403: "the API key may not use this model or endpoint",
    404: "no such model or endpoint (llm.model {model!r}, llm.base_url {base_url!r})",
}


class ParseFailure(ValueError):
    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


@dataclass
class Rating:
    score: float
    rationale: str = ""


_SCORE_KEYS = ("score", "rating", "overall", "value")
_INDEX_KEYS = ("response", "index", "id", "response_index", "response_id")
_RATIONALE_KEYS = ("rationale", "reason", "explanation", "feedback", "justification")
_LIST_KEYS = ("ratings", "scores", "results", "evaluations", "responses")
_FENCE = re.compile(r"```(?:json)?\s*(.*?)```", re.S)


def extract_json(text: str) -> Any:
    """The first JSON object or array in ``text`` (code fences and chatter around it allowed)."""
    candidates = [*_FENCE.findall(text), text]
    decoder = json.JSONDecoder()
    for candidate in candidates:
        for match in re.finditer(r"[\[{]", candidate):
            try:
                value, _ = decoder.raw_decode(candidate, match.start())
            except json.JSONDecodeError:
                continue
            if isinstance(value, dict | list):
                return value
    raise ParseFailure("no_json", f"no JSON object in the answer ({text[:80]!r})")


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        found = re.fullmatch(r"\s*(-?\d+(?:\.\d+)?)\s*(?:/\s*\d+)?\s*", value)
        return float(found.group(1)) if found else None
    return None


def _items(obj: Any) -> list[Any]:
    if isinstance(obj, list):
        return obj
    if isinstance(obj, dict):
        for key in _LIST_KEYS:
            if isinstance(obj.get(key), list):
                return obj[key]
        # {"1": {...}, "2": {...}} or {"response 1": 4, ...}
        numbered = {}
        for key, value in obj.items():
            found = re.search(r"\d+", str(key))
            if found:
                numbered[int(found.group())] = value
        if numbered and len(numbered) == len(obj):
            return [
                {"response": k, **(v if isinstance(v, dict) else {"score": v})}
                for k, v in sorted(numbered.items())
            ]
    raise ParseFailure("shape", f"expected a list of ratings, got {type(obj).__name__}")


def parse_ratings(text: str, n: int, low: float = 1.0, high: float = 5.0) -> list[Rating]:
    """One rating per response, in the order the responses were shown; ParseFailure if not."""
    items = _items(extract_json(text))
    if len(items) != n:
        raise ParseFailure("count", f"{len(items)} ratings for {n} responses")
    ratings: list[Rating] = []
    positions: list[int | None] = []
    for item in items:
        if isinstance(item, dict):
            score = next((_number(item[k]) for k in _SCORE_KEYS if k in item), None)
            index = next((_number(item[k]) for k in _INDEX_KEYS if k in item), None)
            rationale = next((str(item[k]) for k in _RATIONALE_KEYS if k in item), "")
        else:
            score, index, rationale = _number(item), None, ""
        if score is None:
            raise ParseFailure("missing_score", f"no numeric score in {item!r:.80}")
        if not low <= score <= high:
            raise ParseFailure("out_of_range", f"score {score} outside [{low}, {high}]")
        ratings.append(Rating(score, rationale))
        positions.append(int(index) if index is not None and index == int(index) else None)
    if all(p is not None for p in positions):
        if sorted(positions) != list(range(1, n + 1)):  # type: ignore[type-var]
            raise ParseFailure("index", f"response numbers {positions} are not 1..{n}")
        ordered: list[Rating] = [Rating(0)] * n
        for p, rating in zip(positions, ratings, strict=True):
            ordered[p - 1] = rating  # type: ignore[operator]
        return ordered
    return ratings


def ratings_schema(n: int, low: float, high: float) -> dict[str, Any]:
    """JSON schema of the expected answer, for servers that constrain decoding to it."""
    item = {
        "type": "object",
        "properties": {
            "response": {"type": "integer", "minimum": 1, "maximum": n},
            "rationale": {"type": "string"},
            "score": {"type": "integer", "minimum": int(low), "maximum": int(high)},
        },
        "required": ["response", "rationale", "score"],
    }
    return {
        "type": "object",
        "properties": {"ratings": {"type": "array", "items": item, "minItems": n, "maxItems": n}},
        "required": ["ratings"],
    }


def retry_after(response: httpx.Response) -> float | None:
    """Seconds to wait from a Retry-After header (seconds or an HTTP date), if any."""
    value = response.headers.get("retry-after")
    if not value:
        return None
    try:
        return max(float(value), 0.0)
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(when.timestamp() - time.time(), 0.0)


def resolve_api_key(settings: LlmJudgeSettings) -> str | None:
    """The token from the settings, else the secret file, else the environment variable."""
    if settings.api_key is not None:
        return settings.api_key.get_secret_value()
    if settings.api_key_file is not None:
        return settings.api_key_file.read_text().strip() or None
    return os.environ.get(settings.api_key_env) or None


class LlmBackend:
    """Scores a group with one chat request to an LLM judge."""

    name = "llm"

    def __init__(
        self,
        settings: LlmJudgeSettings,
        metrics: JudgeMetrics | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        sleep: Sleep = asyncio.sleep,
    ):
        self.settings = settings
        self.metrics = metrics or JudgeMetrics()
        self._transport = transport
        self._sleep = sleep
        self._token = resolve_api_key(settings)
        self._token_stale = False  # after a 401/403: read api_key_file again before a request
        self._client: httpx.AsyncClient | None = None
        self._limit: asyncio.Semaphore | None = None
        self.template = settings.template or DEFAULT_LLM_TEMPLATE
        try:  # a broken template is a settings error: fail at start, not per group
            self.template.format(instruction="", responses="", n=0)
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(f"llm.template is not a valid format string: {exc!r}") from exc
        self.judge_id = f"llm:{settings.model}"
        if settings.template:
            self.judge_id += "[" + ids.digest(settings.template, prefix="t", size=4) + "]"

    def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = httpx.AsyncClient(
                base_url=self.settings.base_url,
                timeout=self.settings.timeout_s,
                transport=self._transport,
            )
            self._limit = asyncio.Semaphore(self.settings.concurrency)
        return self._client

    def _auth(self) -> dict[str, str]:
        if self._token_stale:
            self._token_stale = False
            try:
                self._token = resolve_api_key(self.settings)
            except OSError as exc:
                log.warning("cannot read llm.api_key_file again: %s", exc)
        return {"Authorization": f"Bearer {self._token}"} if self._token else {}

    def _redact(self, text: str) -> str:
        return text.replace(self._token, "***") if self._token else text

    def render(self, group: m.CompletionGroup, order: list[int]) -> str:
        responses = "\n\n".join(
            f"## Response {k + 1}\n{group.completions[i].text}" for k, i in enumerate(order)
        )
        return self.template.format(
            instruction=instruction_text(group.prompt), responses=responses, n=len(order)
        )

    async def score(self, group: m.CompletionGroup) -> BackendScores:
        n = len(group.completions)
        s = self.settings
        last: ParseFailure | None = None
        for attempt in range(s.parse_retries + 1):
            order = list(range(n))
            if s.shuffle:  # deterministic per group and attempt, so a replay asks the same
                random.Random(f"{group.id}:{attempt}").shuffle(order)
            answer = await self.complete(self.render(group, order), n)
            try:
                shown = parse_ratings(answer, n, s.score_min, s.score_max)
            except ParseFailure as exc:
                self.metrics.parse_failures.labels(exc.reason).inc()
                log.info("unparseable judge answer for %s (try %d): %s", group.id, attempt + 1, exc)
                last = exc
                continue
            scores, rationales = [0.0] * n, [""] * n
            for k, i in enumerate(order):  # shown position k was completion i
                scores[i], rationales[i] = shown[k].score, shown[k].rationale
            return BackendScores(scores, rationales)
        raise JudgeParseError(
            f"LLM judge gave no usable answer in {s.parse_retries + 1} tries; last: {last}"
        )

    async def complete(self, prompt: str, n: int) -> str:
        """One chat completion, with retries on 429, 5xx and network errors."""
        s = self.settings
        body: dict[str, Any] = {
            "model": s.model,
            "messages": [{"role": "user", "content": prompt}],
            "temperature": s.temperature,
            "max_tokens": s.max_tokens,
        }
        if s.json_mode:
            body["response_format"] = {
                "type": "json_schema",
                "json_schema": {
                    "name": "ratings",
                    "schema": ratings_schema(n, s.score_min, s.score_max),
                },
            }
        client = self._http()
        assert self._limit is not None
        delay = s.backoff_s
        async with self._limit:
            for attempt in range(s.max_retries + 1):
                last_try = attempt == s.max_retries
                try:
                    response = await client.post(
                        "chat/completions", json=body, headers=self._auth()
                    )
                except httpx.TransportError as exc:
                    self.metrics.api_errors.labels("network").inc()
                    if last_try:
                        # Down: wait for it, dead-letter nothing. Slow or cut off on this
                        # group: fail the attempt, so a group that always times out ends up
                        # dead-lettered instead of blocking its partition.
                        if isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout):
                            raise TransientError(f"judge endpoint unreachable: {exc!r}") from exc
                        raise JudgeApiError(0, f"request failed: {exc!r}") from exc
                    wait = delay
                else:
                    status = response.status_code
                    if status < 400:
                        return self._content(response)
                    self.metrics.api_errors.labels(str(status)).inc()
                    detail = self._redact(response.text[:300])
                    if status in _REJECTED_HINTS:
                        if status in (401, 403) and s.api_key_file is not None:
                            self._token_stale = True
                        hint = _REJECTED_HINTS[status].format(model=s.model, base_url=s.base_url)
                        raise JudgeRejected(status, f"{hint}; the endpoint said: {detail}")
                    if status != 429 and status < 500:
                        raise JudgeApiError(status, detail)
                    if last_try:
                        raise JudgeUnavailable(status, detail)
                    wait = retry_after(response)
                    if wait is None:
                        wait = delay * random.uniform(0.5, 1.0)  # jitter spreads the herd
                log.warning("judge request failed (try %d); retrying in %.2fs", attempt + 1, wait)
                await self._sleep(min(wait, s.max_backoff_s))
                delay = min(delay * 2, s.max_backoff_s)
        raise AssertionError("unreachable")

    def _content(self, response: httpx.Response) -> str:
        try:
            content = response.json()["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError) as exc:
            raise JudgeApiError(response.status_code, f"not a chat completion: {exc!r}") from exc
        return content or ""

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None
