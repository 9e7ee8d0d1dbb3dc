"""The checkpoint store: one folder per policy version plus the rounds' datasets.

Layout under ``checkpoint_uri`` (a local folder or any fsspec URI, e.g. ``s3://bucket/run``)::

    policy-v<N>/adapter_config.json, adapter_model.safetensors   (or a full model folder)
    policy-v<N>/round.json        written last: the round is complete once it exists
    datasets/round-<N>.parquet    the round's pairs (TRL columns + metadata)
    merged-v<N>/config.json, model.safetensors, tokenizer   (handoff=merged: the adapter
                                  merged into the base weights, what the samplers reload;
                                  written before policy-v<N>, pruned beyond keep_merged)

Saving is idempotent: a round is staged and moved in place by one rename on a local disk;
on object storage (no atomic rename) ``round.json`` is uploaded last and marks completion.
A half-written round is removed on start and retrained from the redelivered pairs.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from onpolicy_trainer.pairs import COLUMNS, Row

log = logging.getLogger(__name__)

MARKER = "round.json"


@dataclass(frozen=True)
class SavedRound:
    version: int
    uri: str  # the policy folder: adapter_uri (LoRA) or checkpoint_uri (full model)
    dataset_uri: str
    meta: dict[str, Any]

    @property
    def full_model(self) -> bool:
        return bool(self.meta.get("full_finetune"))


def rows_table(rows: Sequence[Row]) -> pa.Table:
    if not rows:  # a rollback trains nothing: its dataset still has the columns (no rows)
        return pa.table({c: pa.array([], pa.null()) for c in COLUMNS})
    return pa.Table.from_pylist([{c: row[c] for c in COLUMNS} for row in rows])


class CheckpointStore:
    def __init__(self, uri: str):
        self.fs, root = fsspec.core.url_to_fs(uri)
        self.local = isinstance(self.fs, LocalFileSystem)
        self.root = str(Path(root).resolve()) if self.local else root.rstrip("/")
        if self.local:
            Path(self.root).mkdir(parents=True, exist_ok=True)

    # ------------------------------------------------------------------ naming
    def path(self, *parts: str) -> str:
        return "/".join((self.root, *parts))

    def uri(self, *parts: str) -> str:
        """A location others can open: an absolute path, or the URI with its protocol."""
        return self.fs.unstrip_protocol(self.path(*parts)) if not self.local else self.path(*parts)

    @staticmethod
    def policy_name(version: int) -> str:
        return f"policy-v{version}"

    @staticmethod
    def merged_name(version: int) -> str:
        return f"merged-v{version}"

    @staticmethod
    def dataset_name(version: int) -> str:
        return f"round-{version}.parquet"

    # ------------------------------------------------------------------ reading
    def _versions_present(self) -> list[int]:
        found = []
        for entry in self.fs.ls(self.root, detail=False) if self.fs.exists(self.root) else []:
            name = entry.rstrip("/").rsplit("/", 1)[-1]
            if name.startswith("policy-v") and name[len("policy-v") :].isdigit():
                found.append(int(name[len("policy-v") :]))
        return sorted(found)

    def rounds(self) -> list[SavedRound]:
        """Every complete round, oldest first."""
        out = []
        for version in self._versions_present():
            marker = self.path(self.policy_name(version), MARKER)
            if not self.fs.exists(marker):
                continue
            with self.fs.open(marker, "r") as fh:
                meta = json.load(fh)
            out.append(
                SavedRound(
                    version,
                    self.uri(self.policy_name(version)),
                    self.uri("datasets", self.dataset_name(version)),
                    meta,
                )
            )
        return out

    def read_dataset(self, version: int, columns: list[str] | None = None) -> pa.Table:
        path = self.path("datasets", self.dataset_name(version))
        with self.fs.open(path, "rb") as fh:
            return pq.read_table(fh, columns=columns)

    def pair_ids(self, version: int) -> list[str]:
        return self.read_dataset(version, ["pair_id"]).column("pair_id").to_pylist()

    def fetch(self, saved: SavedRound, cache_dir: Path) -> Path:
        """A local folder holding the round's policy (downloaded once from object storage)."""
        if self.local:
            return Path(self.path(self.policy_name(saved.version)))
        local = cache_dir / self.policy_name(saved.version)
        if not (local / MARKER).exists():
            cache_dir.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix=".fetch-", dir=cache_dir))
            self.fs.get(
                self.path(self.policy_name(saved.version)) + "/", str(staging), recursive=True
            )
            shutil.rmtree(local, ignore_errors=True)
            os.replace(staging, local)
        return local

    # ------------------------------------------------------------------ writing
    def save_merged(self, version: int, folder: Path) -> str:
        """Store a round's merged model folder (before its policy folder, whose marker says the
        round is complete); returns its URI. Idempotent: a leftover is replaced."""
        name = self.merged_name(version)
        if self.local:
            root = Path(self.root)
            staging = root / ".staging" / f"{name}-{uuid.uuid4().hex}"
            staging.parent.mkdir(parents=True, exist_ok=True)
            shutil.copytree(folder, staging)
            for file in staging.iterdir():  # vLLM may run as another user (its own container)
                file.chmod(0o644)
            final = root / name
            if final.exists():
                shutil.rmtree(final)
            os.replace(staging, final)
        else:
            target = self.path(name)
            if self.fs.exists(target):
                self.fs.rm(target, recursive=True)
            for file in sorted(p for p in folder.rglob("*") if p.is_file()):
                self.fs.put_file(str(file), f"{target}/{file.relative_to(folder).as_posix()}")
        return self.uri(name)

    def prune_merged(self, keep: int) -> list[int]:
        """Remove merged folders beyond the newest ``keep`` (adapters and datasets stay)."""
        if not self.fs.exists(self.root):
            return []
        versions = []
        for entry in self.fs.ls(self.root, detail=False):
            name = entry.rstrip("/").rsplit("/", 1)[-1]
            if name.startswith("merged-v") and name[len("merged-v") :].isdigit():
                versions.append(int(name[len("merged-v") :]))
        old = sorted(versions)[:-keep] if keep > 0 else sorted(versions)
        for version in old:
            self.fs.rm(self.path(self.merged_name(version)), recursive=True)
        if old:
            log.info("pruned merged weights of versions %s (keep_merged %d)", old, keep)
        return old

    def clean_incomplete(self) -> list[int]:
        """Remove policy folders without their marker (a crash while saving)."""
        removed = []
        for version in self._versions_present():
            folder = self.path(self.policy_name(version))
            if not self.fs.exists(f"{folder}/{MARKER}"):
                self.fs.rm(folder, recursive=True)
                removed.append(version)
        if self.local:
            shutil.rmtree(Path(self.root) / ".staging", ignore_errors=True)
        if removed:
            log.warning(
                "removed incomplete checkpoints %s (their pairs will be retrained)", removed
            )
        return removed

    def save_round(
        self, version: int, policy_dir: Path, rows: Sequence[Row], meta: dict[str, Any]
    ) -> SavedRound:
        """Store the round's dataset, then its policy folder with the marker; idempotent."""
        meta = {**meta, "version": version}
        table = rows_table(rows)
        name = self.policy_name(version)
        if self.local:
            root = Path(self.root)
            (root / "datasets").mkdir(parents=True, exist_ok=True)
            tmp = root / "datasets" / f".{self.dataset_name(version)}.{uuid.uuid4().hex}"
            pq.write_table(table, tmp)
            os.replace(tmp, root / "datasets" / self.dataset_name(version))
            staging = root / ".staging" / f"{name}-{uuid.uuid4().hex}"
            staging.parent.mkdir(parents=True, exist_ok=True)
            shutil.copytree(policy_dir, staging)
            (staging / MARKER).write_text(json.dumps(meta, indent=2))
            final = root / name
            if final.exists():  # an incomplete leftover: this round replaces it
                shutil.rmtree(final)
            os.replace(staging, final)  # one rename: the folder appears complete or not at all
        else:
            with tempfile.TemporaryDirectory() as tmp:
                local = Path(tmp) / self.dataset_name(version)
                pq.write_table(table, local)
                self.fs.put_file(str(local), self.path("datasets", self.dataset_name(version)))
            folder = self.path(name)
            if self.fs.exists(folder):
                self.fs.rm(folder, recursive=True)
            for file in sorted(p for p in policy_dir.rglob("*") if p.is_file()):
                self.fs.put_file(str(file), f"{folder}/{file.relative_to(policy_dir).as_posix()}")
            self.fs.pipe_file(f"{folder}/{MARKER}", json.dumps(meta, indent=2).encode())
        log.info("saved %s and its dataset (%d pairs) to %s", name, len(rows), self.uri())
        return SavedRound(
            version, self.uri(name), self.uri("datasets", self.dataset_name(version)), meta
        )
