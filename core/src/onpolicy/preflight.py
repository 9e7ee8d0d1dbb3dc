"""Start-up checks in front of a service, so that it fails at once with a message that says
what is missing instead of crash-looping on a traceback or silently running on the CPU.

    python -m onpolicy.preflight --model NAME [--model NAME...] [--wait S]   models are cached
    python -m onpolicy.preflight --gpu -- python -m onpolicy_trainer         GPU, then the service
    python -m onpolicy.preflight --fetch --model NAME...                      fill the cache (Job)

A model NAME is a folder (``/models/...``) or a Hugging Face hub id, looked up in the cache
under ``HF_HUB_CACHE`` (default ``$HF_HOME/hub``) the way ``from_pretrained`` and vLLM find it
with ``HF_HUB_OFFLINE=1``. Empty names are skipped (an unset optional model). ``--fetch``
downloads with ``huggingface_hub`` (the token from ``HF_TOKEN_PATH``); everything else uses
the standard library only, so the sampler image (no torch) runs it too. After ``--`` the
command is exec'd once every check passed. Exit status 1 with one ``preflight:`` line per
failure otherwise.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from pathlib import Path

# The lowest Linux driver branch each CUDA major version runs on (NVIDIA's compatibility table).
MIN_DRIVER = {13: 580, 12: 525}


class PreflightError(RuntimeError):
    """A check failed; the message says what to do."""


def hub_cache() -> Path:
    if cache := os.environ.get("HF_HUB_CACHE"):
        return Path(cache)
    home = os.environ.get("HF_HOME") or str(Path.home() / ".cache" / "huggingface")
    return Path(home) / "hub"


def is_path(name: str) -> bool:
    return name.startswith(("/", "./", "../", "~")) or Path(name).is_dir()


def find_model(name: str) -> Path:
    """The folder holding ``name``'s config.json, or PreflightError saying how to provide it."""
    if is_path(name):
        folder = Path(name).expanduser()
        if (folder / "config.json").is_file():
            return folder
        raise PreflightError(
            f"model folder {folder} has no config.json: copy the model there (the services never "
            "download models), or name a Hugging Face model that the cache holds"
        )
    cache = hub_cache()
    repo = cache / ("models--" + name.replace("/", "--"))
    ref = repo / "refs" / "main"
    if ref.is_file():
        snapshot = repo / "snapshots" / ref.read_text().strip()
        if (snapshot / "config.json").is_file():
            return snapshot
    raise PreflightError(
        f"model {name} is not in the Hugging Face cache {cache} and the services never download "
        "models (HF_HUB_OFFLINE=1): fill the cache first. On Kubernetes the Job onpolicy-models "
        "does it (kubectl -n onpolicy logs job/onpolicy-models; a gated model needs the Secret "
        "onpolicy-hf-token); elsewhere run "
        f"`HF_HOME={cache.parent} python -m onpolicy.preflight --fetch --model {name}`"
    )


def wait_for_models(names: list[str], wait_s: float, poll_s: float = 10.0) -> list[Path]:
    """Every model's folder; waits up to ``wait_s`` for ones still missing (a Job filling them)."""
    deadline = time.monotonic() + wait_s
    while True:
        missing = []
        for name in names:
            try:
                find_model(name)
            except PreflightError as exc:
                missing.append(exc)
        if not missing:
            return [find_model(name) for name in names]
        if time.monotonic() >= deadline:
            raise PreflightError("; ".join(map(str, missing)))
        say(f"waiting for {len(missing)} model(s): {missing[0]}")
        time.sleep(min(poll_s, max(0.0, deadline - time.monotonic())))


def fetch_models(names: list[str]) -> list[Path]:
    """Download every hub model into the cache (folders must already be there)."""
    os.environ["HF_HUB_OFFLINE"] = "0"  # the images set 1 for the services; this is the fetcher
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    for name in names:
        if is_path(name):
            continue
        say(f"fetching {name} into {hub_cache()}")
        try:
            # The consolidated original/ checkpoints some repos carry are never loaded.
            snapshot_download(name, cache_dir=hub_cache(), ignore_patterns=["original/*"])
        except (GatedRepoError, RepositoryNotFoundError) as exc:
            raise PreflightError(
                f"cannot download {name} ({type(exc).__name__}): a gated or private model needs "
                "a Hugging Face token with access, in the Secret onpolicy-hf-token (key token), "
                "read from HF_TOKEN_PATH"
            ) from exc
    return [find_model(name) for name in names]


def _driver_version() -> str | None:
    try:
        text = Path("/proc/driver/nvidia/version").read_text()
    except OSError:
        return None
    words = text.split()
    return next((w for w in words if w[:1].isdigit() and "." in w), text.strip()[:80])


def check_gpu() -> str:
    """A description of the usable CUDA GPUs, or PreflightError saying why there is none."""
    try:
        import torch
    except ImportError as exc:
        raise PreflightError("a GPU is expected but torch is not installed here") from exc
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        available = torch.cuda.is_available() and torch.cuda.device_count() > 0
    if available:
        names = {torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())}
        return f"{torch.cuda.device_count()} GPU(s) ({', '.join(sorted(names))})"
    cuda = torch.version.cuda
    reasons = [f"torch {torch.__version__} sees no CUDA GPU"]
    if cuda is None:
        reasons.append("this torch is a CPU build: build the image from a CUDA index")
    else:
        major = int(cuda.split(".")[0])
        need = MIN_DRIVER.get(major)
        reasons.append(
            f"it is built for CUDA {cuda}"
            + (f", which needs NVIDIA driver {need} or newer" if need else "")
        )
    driver = _driver_version()
    reasons.append(
        f"NVIDIA driver {driver}"
        if driver
        else "no NVIDIA driver is visible (/proc/driver/nvidia/version is missing: no GPU was "
        "given to this container; request nvidia.com/gpu and run on a GPU node)"
    )
    visible = os.environ.get("NVIDIA_VISIBLE_DEVICES", os.environ.get("CUDA_VISIBLE_DEVICES"))
    if visible is not None:
        reasons.append(f"visible devices: {visible!r}")
    reasons += [str(w.message).strip().splitlines()[0] for w in caught][:2]
    raise PreflightError("a GPU is expected but none is usable: " + "; ".join(reasons))


def say(message: str) -> None:
    print(f"preflight: {message}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, command = argv[:cut], argv[cut + 1 :]
    parser = argparse.ArgumentParser(prog="python -m onpolicy.preflight", description=__doc__)
    parser.add_argument("--model", action="append", default=[], help="model folder or hub id")
    parser.add_argument("--wait", type=float, default=0.0, help="seconds to wait for models")
    parser.add_argument("--fetch", action="store_true", help="download the hub models first")
    parser.add_argument("--gpu", action="store_true", help="require a usable CUDA GPU")
    args = parser.parse_args(argv)
    models = [m.strip() for m in args.model if m.strip()]
    try:
        folders = fetch_models(models) if args.fetch else wait_for_models(models, args.wait)
        for name, folder in zip(models, folders, strict=True):
            say(f"model {name}: {folder}")
        if args.gpu:
            say(check_gpu())
    except PreflightError as exc:
        say(f"error: {exc}")
        return 1
    if command:
        os.execvp(command[0], command)
    return 0


if __name__ == "__main__":
    sys.exit(main())
