"""Prompt files: JSONL, Parquet or a local Hugging Face dataset folder, validated per record.

A record is protobuf-JSON of ``onpolicy.v1.Prompt`` (``{"text": ...}`` or ``{"messages":
[...]}``), or a row with a ``prompt`` column (a string, or chat messages as in TRL datasets).
Bad records are reported with their line numbers, and nothing is published if any is bad.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from google.protobuf import json_format

from onpolicy import messages as m
from onpolicy.serde import InvalidRecord


class PromptFileError(ValueError):
    """Some records are bad; ``errors`` lists (line, reason)."""

    def __init__(self, path: Path | str, errors: list[tuple[int, str]]):
        self.errors = errors
        shown = "\n".join(f"  line {line}: {reason}" for line, reason in errors[:20])
        more = f"\n  ... and {len(errors) - 20} more" if len(errors) > 20 else ""
        super().__init__(f"{path}: {len(errors)} bad record(s), nothing published:\n{shown}{more}")


@dataclass(frozen=True)
class PromptSource:
    path: Path | str
    prompts: list[m.Prompt]


def _from_row(row: dict[str, Any]) -> m.Prompt:
    if "prompt" in row and not ({"text", "messages"} & row.keys()):
        value = row.pop("prompt")
        row["messages" if isinstance(value, list) else "text"] = value
        row = {
            k: v
            for k, v in row.items()
            if k in m.Prompt.DESCRIPTOR.fields_by_name
            or k in {f.json_name for f in m.Prompt.DESCRIPTOR.fields}
        }
    prompt = m.Prompt()
    json_format.ParseDict(row, prompt)
    return m.validate(prompt)


def _rows(path: Path) -> Iterator[tuple[int, dict[str, Any] | Exception]]:
    if path.is_dir() or path.suffix == ".parquet":
        import pyarrow.parquet as pq  # only for these formats

        files = sorted(path.rglob("*.parquet")) if path.is_dir() else [path]
        if path.is_dir() and not files:
            raise PromptFileError(path, [(0, "no Parquet files in this dataset folder")])
        line = 0
        for file in files:
            for row in pq.read_table(file).to_pylist():
                line += 1
                yield line, row
        return
    with open(path, encoding="utf-8") as fh:
        for line, text in enumerate(fh, start=1):
            if not text.strip():
                continue
            try:
                row = json.loads(text)
            except json.JSONDecodeError as exc:
                yield line, exc
                continue
            yield line, row if isinstance(row, dict) else ValueError("not a JSON object")


def load_prompts(path: Path | str) -> PromptSource:
    """Every prompt of ``path``, validated (ids filled); raise :class:`PromptFileError`."""
    path = Path(path)
    if not path.exists():
        raise PromptFileError(path, [(0, "no such file or folder")])
    prompts, errors = [], []
    for line, row in _rows(path):
        if isinstance(row, Exception):
            errors.append((line, str(row)))
            continue
        try:
            prompts.append(_from_row(dict(row)))
        except (json_format.ParseError, InvalidRecord, TypeError, ValueError) as exc:
            errors.append((line, str(exc)))
    if errors:
        raise PromptFileError(path, errors)
    if not prompts:
        raise PromptFileError(path, [(0, "no prompts")])
    return PromptSource(path, prompts)


def demo_prompts(split: str = "train") -> PromptSource:
    name = "demo_prompts.jsonl" if split == "train" else "demo_eval_prompts.jsonl"
    with resources.as_file(resources.files("onpolicy.data") / name) as path:
        return load_prompts(path)
