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

        def create_accelerator_and_postprocess(self) -> None:
            super().create_accelerator_and_postprocess()
            _fsdp_on_cpu(self)

    return TokenDPOTrainer


def _fsdp_on_cpu(trainer: Any) -> None:
    """Let accelerate's own FSDP path run on CPU ranks (gloo), as on GPUs.

    accelerate 1.15 switches to ``DistributedType.FSDP`` only for GPU-like multi-device types
    (``AcceleratorState.__init__``); on CPU ranks (``MULTI_CPU``) it drops the FSDP plugin the
    Trainer built from ``fsdp_config`` and wraps the model in DDP instead. PyTorch's FSDP2
    (``fully_shard`` on a CPU device mesh) works with gloo, so on a machine without a GPU the
    shared state is switched to FSDP with that same plugin: from here on ``prepare`` and
    ``get_state_dict`` are accelerate's unchanged FSDP code. Nothing changes on GPUs.
    """
    import torch
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    plugin_args = trainer.args.fsdp_plugin_args
    state = trainer.accelerator.state
    if plugin_args is None or torch.cuda.is_available():
        return
    if state.distributed_type != DistributedType.MULTI_CPU:
        return
    plugin = FullyShardedDataParallelPlugin(**plugin_args)
    if state.mixed_precision != "no":
        plugin.set_mixed_precision(state.mixed_precision)
    state.distributed_type = DistributedType.FSDP
    state.fsdp_plugin = plugin
    trainer.is_fsdp_enabled = True


def use_bf16(settings: TrainerSettings) -> bool:
    """bf16 weights and autocast: as set, else where the GPU supports it."""
    import torch

    if settings.bf16 is not None:
        return settings.bf16
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def fsdp_config(settings: TrainerSettings) -> dict[str, Any]:
    """TrainingArguments ``fsdp_config`` for ``distributed="fsdp"``: full shard, one FSDP
    unit per decoder layer (the model's ``_no_split_modules``), a full state dict to save."""
    v1 = (
        {"sync_module_states": False, "use_orig_params": True} if settings.fsdp_version == 1 else {}
    )
    return v1 | {
        "version": settings.fsdp_version,
        "reshard_after_forward": True if settings.fsdp_version == 2 else "FULL_SHARD",
        "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
        "cpu_offload": settings.fsdp_cpu_offload,
        "activation_checkpointing": settings.gradient_checkpointing,
        "state_dict_type": "FULL_STATE_DICT",
        # Every rank loads the checkpoint itself (so FSDP1 need not broadcast rank 0's
        # weights: sync_module_states off); rank-0-only loading (cpu_ram_efficient_loading)
        # needs the model built on the meta device, which a policy handed over is not.
        "cpu_ram_efficient_loading": False,
    }


def dpo_args(settings: TrainerSettings, scratch: str | Path, *, bf16: bool, cpu: bool) -> dict:
    """The round's DPOConfig keyword arguments (TRL/transformers names), from the settings."""
    args: dict[str, Any] = {
        "output_dir": str(scratch),
        "beta": settings.beta,
        "loss_type": settings.loss_types,
        "learning_rate": settings.learning_rate,
        "num_train_epochs": settings.num_epochs,
        "per_device_train_batch_size": settings.per_device_batch_size,
        "gradient_accumulation_steps": settings.gradient_accumulation_steps,
        "max_length": settings.max_length,
        "bf16": bf16,
        # Without a GPU, several processes (launch.py) need this to train data-parallel
        # on CPUs (gloo); for one process it changes nothing.
        "use_cpu": cpu,
        "seed": settings.seed,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": [],
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
        "precompute_ref_log_probs": settings.precompute_ref_log_probs,
    }
    if settings.distributed == "fsdp":
        args["fsdp"] = True  # full shard, per fsdp_config
        args["fsdp_config"] = fsdp_config(settings)
        # FSDP checkpoints the layers itself (fsdp_config); the Trainer's would all-gather
        # every layer a second time in the backward pass.
        args["activation_checkpointing"] = False
    else:
        args["activation_checkpointing"] = settings.gradient_checkpointing
    return args


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
    bf16 = use_bf16(settings)
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

    config = DPOConfig(**dpo_args(settings, scratch, bf16=bf16, cpu=not torch.cuda.is_available()))
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
    if settings.precompute_ref_log_probs and ref_model is not None:
        # The reference's log-probs are in the dataset now; the copy is not needed any more.
        trainer.ref_model = None
    return trainer


def _full_state_dict(model: Any) -> dict[str, Any]:
    """The whole model's state dict on rank 0 (empty elsewhere); a collective of all ranks.

    PyTorch's own FSDP2 gather (``get_model_state_dict``, full and offloaded to CPU): each
    sharded DTensor's ``full_tensor()``. On the CPU ranks switched to FSDP by
    :func:`_fsdp_on_cpu`, accelerate's ``get_state_dict`` handed back tensors without
    storage of their own (which of its paths did is not checked), which safetensors
    refuses ("Attempted to access the data pointer on an invalid python storage"; seen
    here, every round failed); this call's tensors save (integration test).
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=options)


def _materialized(state_dict: dict[str, Any]) -> dict[str, Any]:
    """Plain tensors of a gathered FSDP2 state dict, safe to save.

    On gloo (CPU ranks) the gathered values come back as functional collectives'
    ``AsyncCollectiveTensor``: a wrapper subclass with no storage of its own, which
    safetensors refuses ("Attempted to access the data pointer on an invalid python
    storage"; seen here). Waiting on it gives the real tensor; the clone owns its memory.
    """
    out = {}
    for key, value in state_dict.items():
        wait = getattr(value, "wait", None)
        if callable(wait):
            value = wait()
        out[key] = value.detach().clone().contiguous()
    return out


def _save_gathered_adapter(model: Any, state_dict: dict[str, Any], output_dir: Path) -> None:
    """Save the "default" adapter from FSDP's gathered full state dict, as PEFT would.

    PEFT's ``save_pretrained(state_dict=...)`` picks the adapter's entries by the model's
    module names, which FSDP's activation checkpointing has wrapped
    (``..._checkpoint_wrapped_module.self_attn...``), while the gathered state dict has the
    plain names: it would keep nothing (an empty adapter file; seen here). So the entries are
    picked by PEFT's own key layout (``<module>.lora_A.default.weight``) and written with the
    adapter name removed, beside the adapter's config, as ``save_pretrained`` writes them.
    """
    import copy

    from safetensors.torch import save_file

    adapter = "default"
    weights = {
        key.replace(f".{adapter}.", "."): value.contiguous()
        for key, value in state_dict.items()
        if ".lora_" in key and f".{adapter}." in key
    }
    if not weights:
        raise RuntimeError("the gathered state dict holds no LoRA weights of the policy")
    output_dir.mkdir(parents=True, exist_ok=True)
    save_file(weights, str(output_dir / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = copy.deepcopy(model.peft_config[adapter])
    config.inference_mode = True
    config.save_pretrained(str(output_dir))


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
        fsdp = bool(trainer.is_fsdp_enabled)

        accelerator = trainer.accelerator
        trained = accelerator.unwrap_model(trainer.model)
        # DDP (launch.py): every rank holds the same weights; rank 0 saves them. FSDP: each
        # rank holds a shard; the full state dict is gathered (a collective: every rank
        # takes part) onto rank 0, which saves it.
        state_dict = _materialized(_full_state_dict(trainer.model)) if fsdp else None
        if accelerator.is_main_process:
            if output_dir.exists():
                shutil.rmtree(output_dir)
            if settings.full_finetune:
                trained.save_pretrained(output_dir, state_dict=state_dict)
                tokenizer.save_pretrained(output_dir)
            elif state_dict is not None:
                _save_gathered_adapter(trained, state_dict, output_dir)
            else:
                # Only the policy: TRL's frozen "ref" copy (reference="previous") is not saved.
                trained.save_pretrained(output_dir, selected_adapters=["default"])
        trainer.accelerator.wait_for_everyone()

    metrics = _round_metrics(history, output.training_loss)
    # TRL's own clock: the steps alone (no model load, no save), beside the round's seconds.
    metrics["train_runtime"] = float((output.metrics or {}).get("train_runtime", math.nan))
    seconds = time.monotonic() - started
    metrics |= {"pairs": float(len(rows)), "seconds": seconds, "fsdp": float(fsdp)}
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
