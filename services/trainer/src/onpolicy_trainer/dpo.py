"""One DPO round with TRL: the training core, callable without Kafka.

``train_round(settings, rows, previous_adapter, output_dir)`` trains on ``rows`` and saves the
result to ``output_dir``: a PEFT LoRA adapter (``save_pretrained``, loadable by vLLM at run
time) or, with ``full_finetune``, a full model folder.

Rows are token ids exactly as the sampler drew them (``prompt_ids``, ``chosen_ids``,
``rejected_ids``; other columns are ignored): the prompt as vLLM templated it, each answer
with an end-of-turn token only where the sample really ended on one. TRL's DPOTrainer works
on those very columns (its ``_prepare_dataset`` would tokenize text into them); here they are
handed over as they are and its tokenization is skipped, so nothing is re-templated, cut or
given an EOS it never had.

Continuing the policy across rounds: with a LoRA, each round starts from the previous
round's adapter weights. With ``reference="base"`` (the default) the adapter is built from
the settings' LoRA config and the previous weights are loaded into it, so TRL computes the
reference log-probs with the adapter disabled (the base model); with ``"previous"`` the
adapter is loaded as a PEFT model, and TRL freezes a copy of it as the reference.
The optimizer state does not carry over between rounds (a fresh AdamW each round).
"""

from __future__ import annotations

import functools
import logging
import math
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from onpolicy_trainer.pairs import Row, sequence_length
from onpolicy_trainer.settings import TrainerSettings

log = logging.getLogger(__name__)

# What the round reports: TRL's logged metrics, averaged over the round's steps.
REWARD_KEYS = (
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margins",
    "rewards/accuracies",
    "logps/chosen",
    "logps/rejected",
)


@dataclass
class RoundResult:
    metrics: dict[str, float]
    output_dir: Path
    num_pairs: int
    seconds: float
    log_history: list[dict[str, Any]] = field(default_factory=list)


TOKEN_COLUMNS = ("prompt_ids", "chosen_ids", "rejected_ids")


def _dataset(rows: Sequence[Row]) -> Any:
    from datasets import Dataset

    return Dataset.from_list([{k: list(row[k]) for k in TOKEN_COLUMNS} for row in rows])


def lora_config(settings: TrainerSettings) -> Any:
    from peft import LoraConfig

    return LoraConfig(
        r=settings.lora_r,
        lora_alpha=settings.lora_alpha,
        lora_dropout=settings.lora_dropout,
        target_modules=list(settings.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )


def zero_adapter(settings: TrainerSettings, output_dir: Path) -> None:
    """Save a fresh LoRA of the trainer's shape: PEFT starts B at zero, so it serves exactly
    the base model (how a rollback to v0 is published like any other adapter)."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(settings.model)
    get_peft_model(model, lora_config(settings)).save_pretrained(output_dir)


def _load_adapter_weights(model: Any, adapter_dir: Path) -> None:
    """Copy a saved adapter's weights into the model's (identically configured) adapter."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    weights = load_file(str(adapter_dir / "adapter_model.safetensors"))
    result = set_peft_model_state_dict(model, weights, adapter_name="default")
    unexpected = [k for k in result.unexpected_keys if "lora_" in k]
    if unexpected:
        raise ValueError(
            f"the previous adapter in {adapter_dir} does not fit the LoRA settings "
            f"(lora_r, target_modules): unexpected {unexpected[:3]}"
        )


def _round_metrics(history: list[dict[str, Any]], train_loss: float) -> dict[str, float]:
    steps = [entry for entry in history if "rewards/margins" in entry]
    metrics: dict[str, float] = {"loss": float(train_loss), "steps": float(len(steps))}
    for key in REWARD_KEYS:
        values = [float(entry[key]) for entry in steps if key in entry]
        if values:
            metrics[key] = sum(values) / len(values)
            metrics[f"last/{key}"] = values[-1]
    return metrics


def preload() -> None:
    """Import the training stack now rather than in the first round.

    torch, transformers and TRL take ~20 s to import on 2 CPU cores; done at start, a broken
    install fails before any pair is consumed and the first round takes as long as the rest.
    """
    from datasets import Dataset  # noqa: F401
    from peft import LoraConfig  # noqa: F401
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback  # noqa: F401
    from trl import DPOConfig, DPOTrainer  # noqa: F401  (lazy modules: resolve them too)


class RoundAborted(Exception):
    """The service is stopping: the round was cut short, and nothing of it is saved."""


@functools.cache
def _trainer_class() -> type:
    """TRL's DPOTrainer, handed rows already in its token-id form.

    ``_prepare_dataset`` would extract a prompt, append EOS to standard-format answers and
    tokenize text; the rows here are the sampled ids, so it is skipped (TRL itself skips it
    for vision datasets). Everything else (collator, loss, reference) is TRL's own.
    """
    from trl import DPOTrainer

    class TokenDPOTrainer(DPOTrainer):
        def _prepare_dataset(self, dataset: Any, *args: Any, **kwargs: Any) -> Any:
            missing = set(TOKEN_COLUMNS) - set(dataset.column_names)
            if missing:
                raise ValueError(f"rows lack the token columns {sorted(missing)}")
            return dataset

    return TokenDPOTrainer


def build_trainer(
    settings: TrainerSettings,
    rows: Sequence[Row],
    previous_adapter: str | Path | None,
    scratch: str | Path,
    callbacks: Sequence[Any] = (),
) -> Any:
    """The round's DPO trainer, ready to ``train()``: the policy continued from
    ``previous_adapter`` and the reference the settings name (see the module docstring)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig

    if not rows:
        raise ValueError("a DPO round needs at least one pair")
    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    previous = Path(previous_adapter) if previous_adapter else None
    bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    dtype = torch.bfloat16 if bf16 else torch.float32

    tokenizer = AutoTokenizer.from_pretrained(settings.model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    too_long = [r for r in rows if sequence_length(r) > settings.max_length]
    if too_long:  # the service drops these before a round (admit); never cut one here
        raise ValueError(
            f"{len(too_long)} rows are longer than max_length ({settings.max_length}) tokens"
        )
    dataset = _dataset(rows)

    ref_model = None
    peft_config = None
    if settings.full_finetune:
        model = AutoModelForCausalLM.from_pretrained(str(previous or settings.model), dtype=dtype)
        # The reference stays the base model across rounds, as with a LoRA's disabled adapter;
        # with reference="previous" it is the model this round starts from.
        if previous is not None:
            ref_source = str(previous) if settings.reference == "previous" else settings.model
            ref_model = AutoModelForCausalLM.from_pretrained(ref_source, dtype=dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(settings.model, dtype=dtype)
        if previous is not None and settings.reference == "previous":
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, str(previous), is_trainable=True)
        else:
            peft_config = lora_config(settings)

    config = DPOConfig(
        output_dir=str(scratch),
        beta=settings.beta,
        loss_type=settings.loss_types,
        learning_rate=settings.learning_rate,
        num_train_epochs=settings.num_epochs,
        per_device_train_batch_size=settings.per_device_batch_size,
        gradient_accumulation_steps=settings.gradient_accumulation_steps,
        max_length=settings.max_length,
        bf16=bf16,
        # Without a GPU, several processes (launch.py) need this to train data-parallel
        # on CPUs (gloo); for one process it changes nothing.
        use_cpu=not torch.cuda.is_available(),
        seed=settings.seed,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    trainer = _trainer_class()(
        model=model,
        ref_model=ref_model,
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=list(callbacks),
    )
    if previous is not None and peft_config is not None:
        _load_adapter_weights(trainer.model, previous)
    return trainer


def train_round(
    settings: TrainerSettings,
    rows: Sequence[Row],
    previous_adapter: str | Path | None,
    output_dir: str | Path,
    should_stop: Callable[[], bool] | None = None,
) -> RoundResult:
    """Run one DPO round on ``rows`` and save the policy to ``output_dir`` (a local folder).

    ``previous_adapter`` is the local folder of the previous round's adapter (or full model
    with ``full_finetune``), or None to start from the base model. ``should_stop`` is asked
    after every step; when it says yes the round ends with :class:`RoundAborted`, so a
    SIGTERM does not wait for a whole round (its pairs stay uncommitted for the restart).
    """
    from transformers import TrainerCallback

    class _StopWhenAsked(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
            if should_stop is not None and should_stop():
                control.should_training_stop = True
            return control

    started = time.monotonic()
    output_dir = Path(output_dir)
    with tempfile.TemporaryDirectory(prefix="onpolicy-dpo-") as scratch:
        trainer = build_trainer(settings, rows, previous_adapter, scratch, [_StopWhenAsked()])
        tokenizer = trainer.processing_class
        output = trainer.train()
        if should_stop is not None and should_stop():
            raise RoundAborted("stopping: the round was cut short and is not saved")
        history = list(trainer.state.log_history)

        trained = trainer.accelerator.unwrap_model(trainer.model)
        # Data-parallel (launch.py): every rank holds the same weights; rank 0 saves them.
        if trainer.accelerator.is_main_process:
            if output_dir.exists():
                shutil.rmtree(output_dir)
            if settings.full_finetune:
                trained.save_pretrained(output_dir)
                tokenizer.save_pretrained(output_dir)
            else:
                # Only the policy: TRL's frozen "ref" copy (reference="previous") is not saved.
                trained.save_pretrained(output_dir, selected_adapters=["default"])
        trainer.accelerator.wait_for_everyone()

    metrics = _round_metrics(history, output.training_loss)
    seconds = time.monotonic() - started
    metrics |= {"pairs": float(len(rows)), "seconds": seconds}
    metrics["pairs_per_s"] = len(rows) / seconds if seconds > 0 else math.inf
    log.info(
        "DPO round on %d pairs in %.1fs: loss %.4f, margins %.4f, accuracy %.2f",
        len(rows),
        seconds,
        metrics["loss"],
        metrics.get("rewards/margins", math.nan),
        metrics.get("rewards/accuracies", math.nan),
    )
    return RoundResult(metrics, output_dir, len(rows), seconds, history)
