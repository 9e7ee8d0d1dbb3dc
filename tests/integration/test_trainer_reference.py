"""The DPO round's continuity and reference, checked against models loaded independently.

Real TRL on SmolLM2-135M: round k+1 starts from round k's weights, and the reference
log-probs a round uses are those of the model its settings name (the base model, or the
previous policy), computed here again with plain transformers + PEFT.
"""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from onpolicy_trainer.dpo import build_trainer, train_round
from onpolicy_trainer.pairs import to_rows
from onpolicy_trainer.settings import TrainerSettings
from onpolicy_trainer.synthetic import make_pairs


@functools.cache
def _tokenizer(model_dir: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def _settings(model_dir: Path, **overrides) -> TrainerSettings:
    values = dict(
        model=str(model_dir),
        max_length=160,
        per_device_batch_size=2,
        learning_rate=5e-3,  # large, so one round moves the weights measurably
        torch_threads=2,
    )
    return TrainerSettings(**(values | overrides))


def _rows(model_dir: Path, n: int = 2, round_: int = 0):
    return to_rows(make_pairs(n, tokenizer=_tokenizer(str(model_dir)), round_=round_))


@pytest.fixture(scope="module")
def previous(model_dir, tmp_path_factory) -> Path:
    """Round 1's adapter, trained on real pairs."""
    out = tmp_path_factory.mktemp("round1") / "policy"
    train_round(_settings(model_dir), _rows(model_dir, 4), None, out)
    return out


def _completion_logps(model, row: dict, which: str) -> float:
    """Sum of log p(answer token | everything before it), one sequence, no padding."""
    ids = torch.tensor([row["prompt_ids"] + row[which]])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, :-1].float()
    logps = torch.log_softmax(logits, -1).gather(1, ids[0, 1:, None])[:, 0]
    return float(logps[len(row["prompt_ids"]) - 1 :].sum())


def _one_batch(trainer):
    batch = next(iter(trainer.get_train_dataloader()))
    mask = batch["attention_mask"].bool()
    sequences = [batch["input_ids"][i][mask[i]].tolist() for i in range(len(mask))]
    return batch, sequences


def _rows_in_batch_order(rows, sequences):
    """The rows behind a batch's chosen sequences (the first half of the batch)."""
    by_chosen = {tuple(r["prompt_ids"] + r["chosen_ids"]): r for r in rows}
    half = len(sequences) // 2
    return [by_chosen[tuple(s)] for s in sequences[:half]]


def _base():
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained


def test_round_trains_exactly_the_sampled_ids_and_continues_the_previous_adapter(
    model_dir, previous, tmp_path
):
    rows = _rows(model_dir, round_=5)
    trainer = build_trainer(_settings(model_dir), rows, previous, tmp_path)
    _, sequences = _one_batch(trainer)
    # Chosen sequences first, then rejected: each is prompt ids + answer ids, as sampled.
    ordered = _rows_in_batch_order(rows, sequences)
    assert sequences == [r["prompt_ids"] + r["chosen_ids"] for r in ordered] + [
        r["prompt_ids"] + r["rejected_ids"] for r in ordered
    ]
    # Round k+1 starts from round k's adapter weights, tensor for tensor.
    saved = load_file(str(previous / "adapter_model.safetensors"))
    live = {
        k.replace(".default", ""): v
        for k, v in trainer.model.state_dict().items()
        if "lora_" in k and ".default." in k
    }
    assert saved and len(saved) == len(live)
    for key, tensor in saved.items():
        assert torch.equal(live[key].cpu(), tensor), key
    assert any(t.abs().sum() > 0 for k, t in saved.items() if "lora_B" in k)  # it trained


@pytest.mark.parametrize("reference", ["base", "previous"])
def test_reference_log_probs_are_those_of_the_model_the_settings_name(
    model_dir, previous, tmp_path, reference
):
    from peft import PeftModel

    rows = _rows(model_dir, round_=9)
    trainer = build_trainer(_settings(model_dir, reference=reference), rows, previous, tmp_path)
    batch, sequences = _one_batch(trainer)
    ref_chosen, ref_rejected = trainer.compute_ref_log_probs(trainer.model, batch)
    ordered = _rows_in_batch_order(rows, sequences)

    base = _base()(str(model_dir), dtype=torch.float32).eval()
    expected = {
        "base": base,
        "previous": PeftModel.from_pretrained(
            _base()(str(model_dir), dtype=torch.float32), str(previous)
        ).eval(),
    }
    other = expected["previous" if reference == "base" else "base"]
    for i, row in enumerate(ordered):
        for got, which in ((ref_chosen[i], "chosen_ids"), (ref_rejected[i], "rejected_ids")):
            want = _completion_logps(expected[reference], row, which)
            assert abs(float(got) - want) < 1e-2 * max(1.0, abs(want) / 100), (which, got, want)
            # The check can fail: the other candidate reference gives other log-probs.
            assert abs(_completion_logps(other, row, which) - want) > 0.05, which


def test_full_finetune_round_saves_a_model_and_continues_from_it(model_dir, tmp_path):
    # full_weights_reload: this test trains the round only, no sampler serves it.
    full = {"full_finetune": True, "full_weights_reload": True}
    settings = _settings(model_dir, **full, learning_rate=1e-4)
    first = tmp_path / "v1"
    train_round(settings, _rows(model_dir), None, first)
    assert (first / "config.json").exists() and (first / "model.safetensors").exists()
    base = load_file(str(model_dir / "model.safetensors"))
    v1 = load_file(str(first / "model.safetensors"))
    moved = [k for k in base if k in v1 and not torch.equal(base[k], v1[k].to(base[k].dtype))]
    assert moved, "a full fine-tune round changed no weight"
    # Round 2 starts from v1's weights, and with reference="previous" scores against v1.
    rows = _rows(model_dir, round_=3)
    prev = _settings(model_dir, **full, reference="previous")
    trainer = build_trainer(prev, rows, first, tmp_path / "scratch")
    live = trainer.model.state_dict()
    assert all(torch.equal(live[k].cpu(), v1[k]) for k in moved[:5])
    batch, sequences = _one_batch(trainer)
    ref_chosen, _ = trainer.compute_ref_log_probs(trainer.model, batch)
    row = _rows_in_batch_order(rows, sequences)[0]
    v1_model = _base()(str(first), dtype=torch.float32).eval()
    assert abs(float(ref_chosen[0]) - _completion_logps(v1_model, row, "chosen_ids")) < 1e-2
