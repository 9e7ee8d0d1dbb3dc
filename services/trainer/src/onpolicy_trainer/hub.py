"""Optional export of each round to the Hugging Face Hub (``hub_repo_id``; the ``hub`` extra).

The checkpoint store stays the source of truth; the Hub is an extra copy for sharing:
``policy-v<N>/`` (the adapter) and ``datasets/round-<N>.parquet`` go to one model repo,
one commit per round. Authentication is huggingface_hub's own (``HF_TOKEN``).
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

from onpolicy_trainer.settings import TrainerSettings
from onpolicy_trainer.store import CheckpointStore, SavedRound

log = logging.getLogger(__name__)


def push_round(
    settings: TrainerSettings, store: CheckpointStore, saved: SavedRound, api: Any = None
) -> None:
    """Upload the round's policy folder and dataset to ``settings.hub_repo_id``."""
    from huggingface_hub import CommitOperationAdd, HfApi

    api = api or HfApi()
    repo = settings.hub_repo_id
    assert repo, "hub_repo_id is not set"
    api.create_repo(repo, private=settings.hub_private, exist_ok=True)
    name = store.policy_name(saved.version)
    with tempfile.TemporaryDirectory() as tmp:
        policy = store.fetch(saved, Path(tmp))
        dataset = Path(tmp) / store.dataset_name(saved.version)
        store.read_dataset(saved.version)  # fails early if the dataset is missing
        with store.fs.open(store.path("datasets", dataset.name), "rb") as src:
            dataset.write_bytes(src.read())
        operations = [
            CommitOperationAdd(f"{name}/{p.relative_to(policy).as_posix()}", str(p))
            for p in sorted(policy.rglob("*"))
            if p.is_file()
        ]
        operations.append(CommitOperationAdd(f"datasets/{dataset.name}", str(dataset)))
        api.create_commit(repo, operations=operations, commit_message=f"{name}")
    log.info("pushed %s and its dataset to the Hub repo %s", name, repo)
