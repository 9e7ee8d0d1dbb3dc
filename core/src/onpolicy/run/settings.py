"""Settings of ``onpolicy run`` (``ONPOLICY_RUN_...``, YAML section ``run:``, or flags)."""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field, model_validator

from onpolicy.budget import DEFAULT_MAX_LENGTH, check_sequence_budget
from onpolicy.settings import ServiceSettings

# The bundled tasks: training prompts, held-out prompts (disjoint) and the judge that scores
# them. "instructions": questions with checkable constraints (onpolicy_judge.constraints),
# scored pass/fail, so the held-out reward is a pass rate a person can verify. "concise": the
# same questions bare, with a judge that rewards form only (short, not repetitive, ended).
TASKS: dict[str, tuple[str, str, list[dict[str, Any]]]] = {
    "instructions": (
        "instructions_prompts.jsonl",
        "instructions_eval_prompts.jsonl",
        # Instruction-level accuracy (IFEval's): the share of a prompt's constraints met. An
        # answer that repeats a sentence of the question scores 0: in the pilots the policy
        # learned to pass "use the word X" and "no commas" by echoing the question.
        [{"name": "instructions", "params": {"partial": True, "no_echo": True}}],
    ),
    "concise": ("demo_prompts.jsonl", "demo_eval_prompts.jsonl", [{"name": "concise"}]),
}


# What `onpolicy demo` (`make demo`) and `python -m benchmarks demo` run when nothing names a
# task; `onpolicy run` keeps "concise", so runs and tests without a task are unchanged.
DEMO_TASK = "instructions"
# `onpolicy demo`'s settings where no flag, YAML or variable names them. Prompts are reused
# (a second pass is sampled by a newer policy, so still on-policy): with the content gate most
# groups of the base model tie at 0, and 3 rounds of 24 pairs needed more than the 192 prompts.
# Four samples per held-out prompt: with two, the paired SE of the gain (0.044 over 3 seeds)
# was almost all sampling noise (a sample scores 0, 0.5 or 1), and a +0.12 gain measured 2.6 SE.
# 40 pairs a round at lr 2e-3 (`python -m benchmarks demo --seeds 3`, README): +0.125, +0.138,
# +0.125 (each >3.5 SE); the run's defaults, 24 pairs at 3e-3, gave +0.104, +0.117, -0.010:
# at 3e-3 both lineages peaked at v2 and fell back in round 3.
DEMO_TRAINER = {
    "learning_rate": 2e-3,
    "loss_type": "sigmoid,sft",
    "per_device_batch_size": 2,
    "max_length": 256,
}
DEMO_DEFAULTS = {
    "task": DEMO_TASK,
    "prompt_epochs": True,
    "eval_samples": 4,
    "prompts_per_round": 40,
    "trainer": DEMO_TRAINER,
}


def bundled(name: str) -> Path:
    return Path(str(resources.files("onpolicy.data") / name))


class RunSettings(ServiceSettings):
    """The loop: sample, judge, pair, DPO, hot-load the adapter, sample again."""

    service: ClassVar[str] = "run"

    task: Literal["instructions", "concise"] = Field(
        "concise",
        description="bundled prompts and judge: instructions (checkable constraints; the "
        "demo's default) or concise (rewards short answers that end: form, not content); "
        "used where prompts, eval_prompts or judge are not set (the judge only with the "
        "task's own training prompts)",
    )
    prompts: Path | None = Field(
        None, description="JSONL, Parquet or dataset folder (default: the task's)"
    )
    eval_prompts: Path | None = Field(None, description="held-out prompts (default: the task's)")
    rounds: int = Field(3, ge=1, description="DPO rounds")
    prompts_per_round: int = Field(
        24,
        ge=1,
        description="pairs per round (the trainer's round_size); the run publishes up to "
        "four fresh training prompts per pair (as far as the prompt set goes): ties make none",
    )
    eval_size: int = Field(
        48, ge=1, description="held-out prompts sampled at each evaluation (48: all of the demo's)"
    )
    prompt_epochs: bool = Field(False, description="reuse the prompt set when it runs out")
    num_samples: int = Field(4, ge=2, description="samples per prompt (N)")
    max_tokens: int = Field(64, ge=1)
    max_prompt_tokens: int = Field(
        192, ge=1, description="prompt budget; with max_tokens it must fit trainer.max_length"
    )
    temperature: float = Field(1.0, ge=0)
    eval_temperature: float = Field(0.7, ge=0, description="sampling temperature of evaluations")
    eval_samples: int = Field(2, ge=1, description="samples per held-out prompt")
    max_staleness: int = Field(0, ge=0, le=1, description="0 strict on-policy, 1 one-step-off")
    compare_offpolicy: bool = Field(
        False,
        description="also train as many pairs per round, all sampled by the initial policy "
        "(more of the prompt set is sampled when ties leave too few)",
    )
    seed: int = 0

    runs_dir: Path = Field(Path("runs"), description="run folders are made here")
    run_id: str | None = Field(None, description="default: a timestamp")
    stage_timeout_s: float = Field(1800.0, gt=0, description="longest wait for one stage")
    max_restarts: int = Field(
        5, ge=0, description="restarts of a crashed service before the run fails (per service)"
    )
    restart_backoff_s: float = Field(
        1.0, ge=0, description="wait before restarting a crashed service (doubles per crash)"
    )
    restart_max_backoff_s: float = Field(30.0, ge=0, description="longest wait before a restart")
    external_stack: bool = Field(
        False, description="use the running Kafka and vLLM (kafka.* and vllm_url) as they are"
    )
    vllm_url: str | None = Field(None, description="with external_stack: the vLLM server")
    model: Path | None = Field(None, description="base model folder (default SmolLM2-135M)")

    # Extra settings per service, merged into their YAML sections (e.g. {"learning_rate": 2e-4}).
    sampler: dict[str, Any] = Field(default_factory=dict)
    judge: dict[str, Any] = Field(default_factory=dict)
    # The demo's DPO: prompts of up to 192 tokens and 64-token answers: 256 tokens
    # hold prompt + answer. A round has
    # only ~20 pairs, so small batches and a high LoRA learning rate: at 2e-4 and batch 4 (five
    # steps) rewards/margins stayed at 0 and the held-out reward did not move in 2 rounds; at
    # 1e-3 it rose by 0.02-0.09 in 3 rounds. Plain DPO at 3e-3 collapsed in round 2 (the policy
    # stopped ending its answers); an NLL term on the chosen answers ("sft", as in RPO) keeps
    # their likelihood up, and 3e-3 then rose by 0.21 and 0.35 in two runs (README).
    trainer: dict[str, Any] = Field(
        default_factory=lambda: {
            "learning_rate": 3e-3,
            "loss_type": "sigmoid,sft",
            "per_device_batch_size": 2,
            "max_length": 256,
        }
    )

    @model_validator(mode="after")
    def _task_defaults(self) -> RunSettings:
        train, held_out, functions = TASKS[self.task]
        if self.prompts is None:
            self.prompts = bundled(train)
            if not {"backend", "functions"} & self.judge.keys():
                self.judge = {**self.judge, "backend": "function", "functions": functions}
        if self.eval_prompts is None:
            self.eval_prompts = bundled(held_out)
        return self

    @model_validator(mode="after")
    def _sequence_budget(self) -> RunSettings:
        # At load, before a broker or vLLM starts: the services' own values, merged as the
        # run folder's config.yaml will hold them.
        check_sequence_budget(
            self.sampler.get("max_prompt_tokens", self.max_prompt_tokens),
            self.sampler.get("max_tokens", self.max_tokens),
            self.trainer.get("max_length", DEFAULT_MAX_LENGTH),
        )
        return self
