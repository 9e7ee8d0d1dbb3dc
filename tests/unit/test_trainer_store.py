"""The trainer's checkpoint store, pair rows and settings (no broker, no training)."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from onpolicy.settings import ConfigError, load_settings
from onpolicy_trainer.pairs import COLUMNS, admit, to_row, to_rows
from onpolicy_trainer.settings import TrainerSettings
from onpolicy_trainer.store import MARKER, CheckpointStore, rows_table
from onpolicy_trainer.synthetic import make_pairs


def fake_adapter(folder: Path, marker: str) -> Path:
    """A policy folder as PEFT writes one (contents are opaque to the store)."""
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps({"r": 8, "marker": marker}))
    (folder / "adapter_model.safetensors").write_bytes(marker.encode() * 10)
    return folder


def test_rows_are_trl_conversational_with_metadata():
    pair = make_pairs(1, policy_version=3)[0]
    row = to_row(pair)
    assert list(row) == list(COLUMNS)
    assert row["prompt"] == [{"role": "user", "content": pair.prompt.messages[0].content}]
    assert row["chosen"] == [{"role": "assistant", "content": pair.chosen}]
    assert row["rejected"] == [{"role": "assistant", "content": pair.rejected}]
    assert (row["pair_id"], row["policy_version"]) == (pair.id, 3)


def test_text_prompts_train_as_sampled_in_trl_standard_format():
    pair = make_pairs(1)[0]
    pair.prompt.ClearField("messages")
    pair.prompt.text = "Say hi."
    pair.prompt.system_prompt = "Be brief."
    row = to_row(pair)
    # The sampler sent this text to /v1/completions, so DPO must not wrap it in a template.
    assert row["prompt"] == "Be brief.\n\nSay hi."
    assert (row["chosen"], row["rejected"]) == (pair.chosen, pair.rejected)


def test_a_round_mixing_chat_and_text_prompts_uses_one_format():
    chat, text = make_pairs(2)
    text.prompt.ClearField("messages")
    text.prompt.text = "Say hi."
    rows = to_rows([chat, text])
    assert rows[1]["prompt"] == [{"role": "user", "content": "Say hi."}]
    assert rows_table(rows).num_rows == 2  # one Parquet schema
    assert to_rows([text])[0]["prompt"] == "Say hi."


@pytest.mark.parametrize(
    ("pair_version", "current", "staleness", "verdict"),
    [(3, 3, 0, "ok"), (2, 3, 0, "stale"), (2, 3, 1, "ok"), (1, 3, 1, "stale"), (4, 3, 0, "ok")],
)
def test_admit_by_staleness(pair_version, current, staleness, verdict):
    pair = make_pairs(1, policy_version=pair_version)[0]
    pair.prompt_token_ids[:], pair.chosen_token_ids[:], pair.rejected_token_ids[:] = [1], [2], [3]
    assert admit(pair, current, staleness, seen=set()) == verdict


def test_admit_drops_seen_ids_first():
    pair = make_pairs(1, policy_version=0)[0]
    assert admit(pair, 5, 0, seen={pair.id}) == "duplicate"


@pytest.mark.parametrize("remote", [False, True], ids=["local", "fsspec-memory"])
def test_save_round_is_complete_idempotent_and_listed(tmp_path, remote):
    uri = f"memory://ckpt-{uuid.uuid4().hex}" if remote else str(tmp_path / "ckpt")
    store = CheckpointStore(uri)
    rows = [to_row(p) for p in make_pairs(5, policy_version=0)]
    saved = store.save_round(1, fake_adapter(tmp_path / "a1", "one"), rows, {"num_pairs": 5})
    # Saving the same version again (a retrained round after a crash) replaces it cleanly.
    saved = store.save_round(1, fake_adapter(tmp_path / "a1b", "two"), rows, {"num_pairs": 5})

    [listed] = store.rounds()
    assert (listed.version, listed.meta["num_pairs"]) == (1, 5)
    assert listed.uri == saved.uri
    assert saved.uri.startswith("memory://" if remote else "/")
    assert store.pair_ids(1) == [r["pair_id"] for r in rows]
    table = store.read_dataset(1)
    assert table.column_names == list(COLUMNS)
    assert table.column("prompt").to_pylist()[0] == rows[0]["prompt"]

    local = store.fetch(listed, tmp_path / "cache")
    assert json.loads((local / "adapter_config.json").read_text())["marker"] == "two"
    assert (local / MARKER).exists()


def test_incomplete_rounds_are_not_listed_and_are_cleaned(tmp_path):
    store = CheckpointStore(str(tmp_path))
    rows = [to_row(p) for p in make_pairs(2)]
    store.save_round(1, fake_adapter(tmp_path / "a1", "one"), rows, {})
    # A crash while uploading to object storage leaves a folder without its marker.
    fake_adapter(tmp_path / "policy-v2", "half")
    assert [r.version for r in store.rounds()] == [1]
    assert store.clean_incomplete() == [2]
    assert not (tmp_path / "policy-v2").exists()
    assert [r.version for r in store.rounds()] == [1]


def test_dataset_is_plain_parquet_readable_by_datasets(tmp_path):
    from datasets import Dataset

    store = CheckpointStore(str(tmp_path))
    rows = [to_row(p) for p in make_pairs(3)]
    saved = store.save_round(1, fake_adapter(tmp_path / "a", "x"), rows, {})
    ds = Dataset.from_parquet(saved.dataset_uri)
    assert ds.num_rows == 3
    assert ds[0]["chosen"][0]["role"] == "assistant"
    assert pq.read_metadata(saved.dataset_uri).num_rows == 3


def test_settings_defaults_env_and_errors(monkeypatch):
    monkeypatch.setenv("ONPOLICY_MODEL_PATH", "/models/base")
    monkeypatch.setenv("ONPOLICY_TRAINER_ROUND_SIZE", "16")
    monkeypatch.setenv("ONPOLICY_TRAINER_TARGET_MODULES", '["q_proj","v_proj"]')
    settings = load_settings(TrainerSettings)
    assert settings.model == "/models/base"
    assert settings.round_size == 16
    assert settings.target_modules == ["q_proj", "v_proj"]
    assert (settings.lora_r, settings.per_device_batch_size, settings.max_staleness) == (8, 4, 0)
    assert settings.loss_types == ["sigmoid"]
    with pytest.raises(ConfigError, match="round_size"):
        load_settings(TrainerSettings, round_size=0)
    with pytest.raises(ConfigError, match="max_length"):
        load_settings(TrainerSettings, max_length=8)
