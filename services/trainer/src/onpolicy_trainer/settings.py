"""Settings of the trainer (``ONPOLICY_TRAINER_...``, or shared ``ONPOLICY_...``)."""

from __future__ import annotations

import os
from typing import ClassVar, Literal

from pydantic import BaseModel, Field, model_validator

from onpolicy.budget import DEFAULT_MAX_LENGTH
from onpolicy.settings import ServiceSettings
from onpolicy.stack.settings import default_home


def _default_model() -> str:
    # `onpolicy up` exports ONPOLICY_MODEL_PATH for every service; otherwise the cached default.
    if path := os.environ.get("ONPOLICY_MODEL_PATH"):
        return path
    return str(default_home() / "models" / "SmolLM2-135M-Instruct")


class EvaluationSettings(BaseModel):
    """Held-out evaluation of every policy version, and the regression guard.

    The guard is on by default: a deployment trains unattended, and a policy that scores
    worse than an earlier one on prompts it never trained on (a judge being gamed, a bad
    round) would otherwise be sampled and trained on by every later round. Rolling back costs
    one round; not rolling back costs every round after it. With ``margin_se`` 2 an unchanged
    policy is rolled back by chance in about 1 round in 40 (one-sided, normal scores).
    """

    enabled: bool = Field(
        True, description="aggregate the held-out scores of each version into the evals topic"
    )
    timeout_s: float = Field(
        600.0,
        gt=0,
        description="publish a version's evaluation partial (complete=false) this long after "
        "its first held-out score, when some held-out prompts never get scored",
    )
    guard: bool = Field(
        True,
        description="roll back a version whose held-out score is below the best earlier "
        "promoted version's by more than margin_se standard errors",
    )
    margin_se: float = Field(
        2.0, ge=0, description="the guard's margin, in standard errors of the difference"
    )
    wait_s: float = Field(
        600.0,
        ge=0,
        description="how long a round waits for the evaluation of the policy that sampled "
        "it before training unguarded (logged)",
    )


class TrainerSettings(ServiceSettings):
    """Trainer: DPO rounds with TRL on streamed preference pairs, publishing LoRA policies."""

    service: ClassVar[str] = "trainer"

    model: str = Field(
        default_factory=_default_model,
        description="base model folder (default ONPOLICY_MODEL_PATH or the cached SmolLM2)",
    )
    checkpoint_uri: str = Field(
        "./checkpoints", description="local folder or fsspec URI for adapters and datasets"
    )
    group_id: str = Field("trainer", description="Kafka consumer group")

    # Rounds
    round_protocol: bool = Field(
        True,
        description="plan each round on the rounds topic (which prompts, sampled by which "
        "policy) and train once all of them are judged: on-policy with any number of sampler "
        "replicas, nothing sampled in vain; off: train every round_size pairs as they come",
    )
    round_size: int = Field(64, ge=1, description="pairs per DPO round")
    round_timeout_s: float = Field(
        600.0,
        gt=0,
        description="run a round with what is buffered after this many seconds (protocol: "
        "once its prompts are all judged and no more can be planned)",
    )
    max_version: int | None = Field(
        None,
        ge=1,
        description="round protocol: plan no round past this policy version (a run of N "
        "rounds; none: train for as long as prompts come)",
    )
    drain_timeout_s: float = Field(
        30.0, gt=0, description="on SIGTERM, wait this long for a running round to publish"
    )
    max_staleness: int = Field(
        0, ge=0, description="accept pairs sampled from up to this many versions back"
    )

    # DPO (TRL DPOConfig)
    beta: float = Field(0.1, gt=0)
    loss_type: str = Field("sigmoid", description="TRL DPO loss type(s), comma separated")
    learning_rate: float = Field(1e-4, gt=0)
    num_epochs: float = Field(1.0, gt=0)
    per_device_batch_size: int = Field(4, ge=1)
    gradient_accumulation_steps: int = Field(1, ge=1)
    max_length: int = Field(
        DEFAULT_MAX_LENGTH,
        ge=16,
        description="prompt + completion tokens; a longer pair is dropped (too_long), never "
        "cut. Fit it to the sampler's max_prompt_tokens + max_tokens",
    )
    reference: Literal["base", "previous"] = Field(
        "base",
        description="DPO reference: the base model (adapter disabled) or the previous policy",
    )

    # LoRA (PEFT)
    full_finetune: bool = Field(
        False,
        description="train every weight instead of a LoRA (needs full_weights_reload: the "
        "sampler hot-loads LoRA adapters only)",
    )
    full_weights_reload: bool = Field(
        False,
        description="the deployment reloads full checkpoints into vLLM some other way than the "
        "sampler (which refuses them); required by full_finetune",
    )
    handoff: Literal["merged", "lora"] = Field(
        "merged",
        description="how samplers serve each policy: merged (the adapter merged into the base "
        "weights, float32, saved as merged-v<N>/ and named by PolicyUpdate.checkpoint_uri; "
        "vLLM reloads it in place) or lora (the adapter, loaded at run time). ONPOLICY_HANDOFF "
        "sets stack, sampler and trainer at once",
    )
    keep_merged: int = Field(
        2, ge=1, description="merged folders kept in the store (older ones are pruned)"
    )
    lora_r: int = Field(8, ge=1, description="LoRA rank, at most max_lora_rank")
    max_lora_rank: int = Field(
        16,
        ge=1,
        description="largest LoRA rank the samplers' vLLM serves (its --max-lora-rank; "
        "ONPOLICY_MAX_LORA_RANK sets stack, sampler and trainer at once)",
    )
    lora_alpha: int = Field(16, ge=1)
    lora_dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
        description="modules given a LoRA",
    )

    evaluation: EvaluationSettings = Field(
        default_factory=EvaluationSettings,
        description="held-out evaluation per version and the regression guard",
    )

    seed: int = 0
    torch_threads: int = Field(0, ge=0, description="torch CPU threads (0: torch's default)")
    train_processes: int = Field(
        0,
        ge=0,
        description=(
            "processes per DPO round: 0 = one per visible GPU; 1 trains inside the service "
            "(also on a CPU); N > 1 trains data-parallel in N child processes (torchrun, "
            "accelerate through TRL's trainer)"
        ),
    )

    # Large models (accelerate + TRL; see "Model sizes and GPUs" in the trainer README)
    distributed: Literal["ddp", "fsdp"] = Field(
        "ddp",
        description="how a round's processes share the model: ddp (a full copy of weights, "
        "gradients and AdamW states on every rank, gradients all-reduced) or fsdp (PyTorch "
        "FSDP through accelerate, full shard: weights, gradients and optimizer states split "
        "across every rank of every node, gathered one decoder layer at a time)",
    )
    fsdp_version: Literal[1, 2] = Field(
        2,
        description="FSDP implementation (TrainingArguments fsdp_config['version']): 2 "
        "(fully_shard, DTensor parameters) or 1 (the legacy FullyShardedDataParallel wrapper, "
        "deprecated by transformers)",
    )
    fsdp_cpu_offload: bool = Field(
        False,
        description="fsdp: keep the sharded parameters, gradients and optimizer states in host "
        "memory between uses (fsdp_config['cpu_offload']; slower, fits more)",
    )
    gradient_checkpointing: bool = Field(
        True,
        description="recompute each decoder layer's activations in the backward pass instead "
        "of keeping them (on by default, as in TRL's DPOConfig; TrainingArguments "
        "activation_checkpointing, under fsdp FSDP's own fsdp_config['activation_checkpointing'] "
        "instead, which avoids a second all-gather)",
    )
    bf16: bool | None = Field(
        None,
        description="weights and autocast in bfloat16 (TrainingArguments bf16 and the model's "
        "dtype); none: where the GPU supports it (fp32 on a CPU)",
    )
    precompute_ref_log_probs: bool = Field(
        False,
        description="full_finetune: compute the reference's log-probs of every pair once, "
        "before training (DPOConfig precompute_ref_log_probs), so no reference model is held "
        "during the steps (under fsdp TRL loads it for the pass, then frees it). Off: the "
        "reference is a frozen copy, sharded like the policy under fsdp. A LoRA never needs "
        "it: its reference is the base with the adapter disabled",
    )
    nnodes: int = Field(
        1,
        ge=1,
        description="nodes (pods) a round's ranks span; > 1 needs rdzv_endpoint, and a worker "
        "on every other node (python -m onpolicy_trainer.launch --worker, see deploy/)",
    )
    rdzv_endpoint: str | None = Field(
        None,
        description="host:port of torchrun's c10d rendezvous when nnodes > 1 (this pod's "
        "address: its ranks are rank 0, which saves the policy)",
    )
    rdzv_id: str = Field("onpolicy-trainer", description="torchrun rendezvous id (nnodes > 1)")

    # Optional Hugging Face Hub export (needs the `hub` extra and a token)
    hub_repo_id: str | None = Field(
        None, description="push each round's adapter and dataset to this Hub repo"
    )
    hub_private: bool = True

    @model_validator(mode="after")
    def _servable(self) -> TrainerSettings:
        if self.full_finetune and not self.full_weights_reload and self.handoff != "merged":
            raise ValueError(
                "full_finetune publishes full checkpoints (PolicyUpdate.checkpoint_uri), which "
                "the sampler cannot hot-load: vLLM's runtime API loads LoRA adapters only. "
                "Use handoff=merged (the samplers reload full weights in place) "
                "[env ONPOLICY_HANDOFF], train LoRA adapters (full_finetune=false), or set "
                "full_weights_reload=true "
                "[env ONPOLICY_TRAINER_FULL_WEIGHTS_RELOAD] only if this deployment reloads "
                "full weights into vLLM some other way"
            )
        if not self.full_finetune and self.handoff == "lora" and self.lora_r > self.max_lora_rank:
            raise ValueError(
                f"lora_r ({self.lora_r}) is above max_lora_rank ({self.max_lora_rank}), the "
                "largest rank the samplers' vLLM serves (--max-lora-rank): every sampler would "
                "refuse the adapters. Lower lora_r [env ONPOLICY_TRAINER_LORA_R] or raise "
                "max_lora_rank for vLLM, sampler and trainer together [env ONPOLICY_MAX_LORA_RANK]"
            )
        if self.nnodes > 1 and not self.rdzv_endpoint:
            raise ValueError(
                f"nnodes ({self.nnodes}) > 1 needs rdzv_endpoint, the host:port of this pod's "
                "c10d rendezvous that the other nodes' workers join "
                "[env ONPOLICY_TRAINER_RDZV_ENDPOINT]"
            )
        if self.nnodes > 1 and self.train_processes == 1:
            raise ValueError(
                "nnodes > 1 trains in child processes under torchrun: train_processes must not "
                "be 1 (0: one per visible GPU) [env ONPOLICY_TRAINER_TRAIN_PROCESSES]"
            )
        if self.distributed == "fsdp" and self.train_processes == 1 and self.nnodes == 1:
            raise ValueError(
                "distributed=fsdp shards the model across processes, and train_processes=1 "
                "trains in the service process, unsharded: set train_processes to the number "
                "of GPUs (0: one per visible GPU) [env ONPOLICY_TRAINER_TRAIN_PROCESSES] or "
                "distributed=ddp [env ONPOLICY_TRAINER_DISTRIBUTED]"
            )
        if self.distributed != "fsdp" and self.fsdp_cpu_offload:
            raise ValueError(
                "fsdp_cpu_offload offloads FSDP shards and needs distributed=fsdp "
                "[env ONPOLICY_TRAINER_DISTRIBUTED]"
            )
        if self.precompute_ref_log_probs and not self.full_finetune:
            raise ValueError(
                "precompute_ref_log_probs is for full_finetune: a LoRA's reference is the base "
                "model with the adapter disabled, which holds no second copy "
                "[env ONPOLICY_TRAINER_PRECOMPUTE_REF_LOG_PROBS]"
            )
        return self

    @property
    def loss_types(self) -> list[str]:
        return [part.strip() for part in self.loss_type.split(",") if part.strip()]
