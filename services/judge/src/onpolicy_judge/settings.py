"""Settings of the judge (``ONPOLICY_JUDGE_...``, or shared ``ONPOLICY_...``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, Field, SecretStr

from onpolicy.settings import ServiceSettings

DEFAULT_LLM_TEMPLATE = """\
You are an impartial judge. Rate each response to the instruction below for helpfulness, \
correctness, honesty and concision on a scale of 1 (poor) to 5 (excellent).

# Instruction
{instruction}

# Responses
{responses}

Answer with JSON only, exactly in this form, one entry per response ({n} entries):
{{"ratings": [{{"response": 1, "rationale": "<one short sentence>", "score": <1-5>}}, ...]}}
"""


class ScorerSpec(BaseModel):
    """One function scorer: a built-in name or ``module:function``, its weight and options."""

    name: str = Field(description="built-in (concise, length, repetition, ...) or module:function")
    weight: float = Field(1.0, gt=0)
    params: dict[str, Any] = Field(default_factory=dict, description="keyword arguments")

    model_config = {"extra": "forbid"}


class RewardModelSettings(BaseModel):
    """A Hugging Face sequence-classification reward model (e.g. Skywork-Reward-V2)."""

    model: str = Field("", description="model folder or hub name (HF_HUB_OFFLINE is honoured)")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: cuda when present")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="auto: bfloat16 on a GPU, float32 on the CPU"
    )
    max_length: int = Field(4096, ge=16, description="longer sequences are truncated (counted)")
    batch_tokens: int = Field(16384, ge=16, description="padded tokens per forward pass")
    max_batch_size: int = Field(64, ge=1)
    batch_wait_ms: float = Field(
        5.0, ge=0, description="wait this long for more groups to fill a batch"
    )
    trust_remote_code: bool = False


class LlmJudgeSettings(BaseModel):
    """An LLM judge behind any OpenAI-compatible chat endpoint."""

    base_url: str = Field("http://127.0.0.1:8001/v1", description="OpenAI-compatible base URL")
    model: str = Field("SmolLM2-135M-Instruct", description="judge model name")
    api_key: SecretStr | None = Field(None, description="bearer token (else api_key_file/env)")
    api_key_file: Path | None = Field(None, description="file holding the token (a secret)")
    api_key_env: str = Field("OPENAI_API_KEY", description="environment variable with the token")
    template: str = Field(
        "", description="prompt with {instruction} {responses} {n}; empty: the built-in one"
    )
    temperature: float = Field(0.0, ge=0)
    max_tokens: int = Field(512, ge=1)
    json_mode: bool = Field(
        False, description="ask for response_format=json_schema (vLLM, OpenAI support it)"
    )
    shuffle: bool = Field(True, description="shuffle response order per group (position bias)")
    concurrency: int = Field(8, ge=1, description="requests in flight to the endpoint")
    timeout_s: float = Field(120.0, gt=0)
    max_retries: int = Field(5, ge=0, description="HTTP retries on 429, 5xx and network errors")
    backoff_s: float = Field(
        1.0, ge=0, description="first retry delay (doubles), unless Retry-After"
    )
    max_backoff_s: float = Field(60.0, ge=0)
    parse_retries: int = Field(2, ge=0, description="new requests after an unparseable answer")
    score_min: float = 1.0
    score_max: float = 5.0


class PairSettings(BaseModel):
    """How preference pairs are built from a scored group."""

    strategy: Literal["best_worst", "best_vs_rest", "all"] = Field(
        "best_worst", description="which candidate pairs are considered"
    )
    min_margin: float = Field(0.0, ge=0, description="drop pairs whose margin is below this")
    drop_ties: bool = Field(True, description="drop pairs whose scores are equal")
    tie_epsilon: float = Field(1e-9, ge=0, description="scores closer than this are a tie")
    finished: Literal["require", "prefer", "off"] = Field(
        "require",
        description="require: the chosen answer always ended (finish_reason=stop), and a "
        "group where none ended gives no pair (none_finished); prefer: the chosen ended when "
        "any did, else a cut-off answer may be chosen; off: scores alone decide",
    )
    max_pairs_per_prompt: int = Field(1, ge=1)
    length_alpha: float = Field(
        0.0,
        ge=0,
        description="length normalisation: rank by score / n**alpha for scores >= 0 and "
        "score * n**alpha below 0 (n: completion tokens), so length never helps; 0: off",
    )


class GrpcSettings(BaseModel):
    """The synchronous ``onpolicy.v1.Judge/Score`` gRPC service and gRPC health."""

    enabled: bool = True
    host: str = "0.0.0.0"
    port: int = Field(50051, ge=0, le=65535, description="0 picks a free port")


class JudgeSettings(ServiceSettings):
    """Judge: scores completion groups and builds preference pairs."""

    service: ClassVar[str] = "judge"

    backend: Literal["function", "reward_model", "llm"] = Field(
        "function", description="which judge scores the groups"
    )
    judge_id: str = Field("", description="id recorded in scores and pairs (default: derived)")
    group_id: str = Field("judge", description="Kafka consumer group")
    concurrency: int = Field(16, ge=1, description="groups in flight")
    max_attempts: int = Field(3, ge=1, description="tries of a failing group before dead letter")
    max_transient_attempts: int = Field(
        20,
        ge=1,
        description="failures that look transient (5xx, 429) of one group, while others get "
        "through, before it is dead-lettered as poison",
    )
    retry_backoff_s: float = Field(0.5, ge=0, description="first delay between a group's tries")
    max_backoff_s: float = Field(30.0, ge=0, description="longest delay between a group's tries")
    breaker_failures: int = Field(
        5, ge=1, description="consecutive transient failures that open the circuit breaker"
    )
    breaker_reset_s: float = Field(
        5.0, gt=0, description="circuit breaker cool-down before a probe (doubles while failing)"
    )
    breaker_max_reset_s: float = Field(30.0, gt=0, description="longest breaker cool-down")

    functions: list[ScorerSpec] = Field(
        default_factory=lambda: [ScorerSpec(name="concise")],
        description='function scorers, JSON: [{"name": "concise", "weight": 1}]',
    )
    reward_model: RewardModelSettings = Field(default_factory=RewardModelSettings)
    llm: LlmJudgeSettings = Field(default_factory=LlmJudgeSettings)
    pairs: PairSettings = Field(default_factory=PairSettings)
    grpc: GrpcSettings = Field(default_factory=GrpcSettings)
