"""What every scoring backend is and returns (its own module: the backends and the judge both
import it, and none of them imports another)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from onpolicy import messages as m


@dataclass
class BackendScores:
    scores: list[float]
    rationales: list[str] = field(default_factory=list)


class Backend(Protocol):
    """Scores every completion of a group; raises RecordError for unusable groups."""

    name: str  # "function" | "reward_model" | "llm"
    judge_id: str

    async def score(self, group: m.CompletionGroup) -> BackendScores: ...

    async def aclose(self) -> None: ...
