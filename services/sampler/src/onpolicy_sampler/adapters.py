"""Adapter folders on the sampler's side: fetch them, name them by content, check them.

A policy's vLLM name is ``<prefix>-v<N>-<digest>``, the digest a short hash of the adapter's
files, so two lineages (or two runs) that publish the same version under the same prefix get
different names whenever their adapters differ. Everything that can go wrong while a policy
is made ready is a :class:`LoadFailure` with a ``reason`` (the metric's label) and whether it
is ``permanent`` (retrying cannot help: wait for a later version) or transient (retry with
:class:`Backoff`).
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import fsspec

# Files of a policy folder that are bookkeeping, not the adapter vLLM loads.
METADATA_FILES = frozenset({"round.json", "README.md"})
DIGEST_CHARS = 10


class LoadFailure(Exception):
    """A policy could not be made ready; ``reason`` labels the failures metric."""

    def __init__(self, reason: str, message: str, *, permanent: bool):
        super().__init__(message)
        self.reason = reason
        self.permanent = permanent


def permanent(reason: str, message: str) -> LoadFailure:
    return LoadFailure(reason, message, permanent=True)


def transient(reason: str, message: str) -> LoadFailure:
    return LoadFailure(reason, message, permanent=False)


@dataclass
class Backoff:
    """Exponential delays with a cap and +-10% jitter; the one retry schedule of the sampler's
    policy handling (fetches, vLLM's LoRA API)."""

    initial_s: float = 0.5
    maximum_s: float = 15.0
    factor: float = 2.0
    attempts: int = 0

    def next_delay(self) -> float:
        delay = min(self.initial_s * self.factor**self.attempts, self.maximum_s)
        self.attempts += 1
        return delay * random.uniform(0.9, 1.1)

    def reset(self) -> None:
        self.attempts = 0


def adapter_name(version: int, digest: str, prefix: str = "policy") -> str:
    return f"{prefix}-v{version}-{digest}"


def _uri_key(uri: str) -> str:
    return hashlib.sha256(uri.encode()).hexdigest()[:16]


def fetch_adapter(uri: str, cache_dir: Path, marker: str = "adapter_config.json") -> Path:
    """A local folder holding the adapter (or, with ``marker="config.json"``, the model): the
    URI itself, or a copy fetched with fsspec.

    A folder (or object) that is not there yet is a transient failure: the trainer's volume
    or bucket may show it a little later. A URI no filesystem understands is permanent.
    """
    if "://" not in uri or uri.startswith("file://"):
        path = Path(uri.removeprefix("file://"))
        if not (path / marker).is_file():
            raise transient("fetch", f"no {marker} in {path} (yet)")
        return path
    try:
        fs, remote = fsspec.core.url_to_fs(uri)
    except (ImportError, ValueError) as exc:
        raise permanent("fetch", f"cannot open {uri}: {exc}") from exc
    # Keyed by the URI: two lineages' "policy-v1" folders never share a cache entry.
    target = cache_dir / _uri_key(uri)
    if not (target / marker).is_file():
        partial = target.with_name(target.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        try:
            fs.get(remote.rstrip("/") + "/", str(partial), recursive=True)
            if not (partial / marker).is_file():
                raise FileNotFoundError(f"no {marker} under {uri}")
            shutil.rmtree(target, ignore_errors=True)
            partial.rename(target)
        except Exception as exc:  # fsspec backends raise their own error types
            shutil.rmtree(partial, ignore_errors=True)
            raise transient("fetch", f"fetching {uri} failed: {exc!r}") from exc
    return target


def content_digest(folder: Path, chars: int = DIGEST_CHARS) -> str:
    """A short hash of the adapter's files (names and bytes; bookkeeping files left out)."""
    digest = hashlib.sha256()
    files = sorted(
        p
        for p in folder.rglob("*")
        if p.is_file() and p.name not in METADATA_FILES and not p.name.startswith(".")
    )
    for path in files:
        digest.update(path.relative_to(folder).as_posix().encode() + b"\0")
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        digest.update(b"\0")
    return digest.hexdigest()[:chars]


def adapter_config(folder: Path) -> dict:
    try:
        config = json.loads((folder / "adapter_config.json").read_text())
    except (OSError, ValueError) as exc:
        raise permanent("bad_adapter", f"cannot read {folder}/adapter_config.json: {exc}") from exc
    if not isinstance(config, dict):
        raise permanent("bad_adapter", f"{folder}/adapter_config.json is not a JSON object")
    return config


def adapter_rank(config: dict) -> int:
    """The largest LoRA rank of an adapter: ``r``, or a larger one in ``rank_pattern``."""
    try:
        ranks = [int(config.get("r") or 0)]
        ranks += [int(r) for r in (config.get("rank_pattern") or {}).values()]
    except (TypeError, ValueError, AttributeError) as exc:
        raise permanent(
            "bad_adapter", f"unreadable LoRA rank in adapter_config.json: {exc}"
        ) from exc
    return max(ranks)


def check_rank(config: dict, max_lora_rank: int, where: str) -> None:
    rank = adapter_rank(config)
    if rank > max_lora_rank:
        raise permanent(
            "rank",
            f"adapter {where} has LoRA rank {rank}, above max_lora_rank {max_lora_rank} "
            "(vLLM's --max-lora-rank): vLLM cannot serve it; train with a lower lora_r or "
            "raise ONPOLICY_MAX_LORA_RANK for vLLM, sampler and trainer together",
        )


def same_base_model(published: str, served: set[str]) -> bool:
    """Whether a policy's base model is the one vLLM serves.

    ``published`` is the trainer's model (a folder or a Hub id); ``served`` holds vLLM's
    served name and the path or id it loaded. Equal, or the same last path part
    (``/models/SmolLM2-135M-Instruct`` and ``HuggingFaceTB/SmolLM2-135M-Instruct``). An empty
    ``published`` (an older trainer) is not checked.
    """
    if not published:
        return True
    names = {s.rstrip("/") for s in served if s}
    if published.rstrip("/") in names:
        return True
    tail = Path(published.rstrip("/")).name
    return bool(tail) and tail in {Path(s).name for s in names}


def uri_allowed(uri: str, prefixes: Sequence[str]) -> bool:
    """Whether ``uri`` lies under one of ``prefixes`` (the checkpoint store). Local paths are
    compared resolved, so ``..`` cannot climb out; a remote URI must start with a prefix of
    the same scheme."""
    if "://" not in uri or uri.startswith("file://"):
        path = Path(uri.removeprefix("file://")).resolve()
        for prefix in prefixes:
            if "://" in prefix and not prefix.startswith("file://"):
                continue
            root = Path(prefix.removeprefix("file://")).resolve()
            if path == root or root in path.parents:
                return True
        return False
    return any("://" in prefix and uri.startswith(prefix.rstrip("/") + "/") for prefix in prefixes)
