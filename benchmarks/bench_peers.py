"""Side by side with the peers: onpolicy, the one-process recipe and TRL's OnlineDPOTrainer.

The same base model (SmolLM2-135M-Instruct), the demo's task (``instructions``: checkable
constraints, judged by ``onpolicy_judge.constraints.instructions`` with ``partial``), the
same training prompts in the same order, the same DPO hyper-parameters (the demo's: LoRA r8
on q/k/v/o, lr 2e-3, beta 0.1, batch 2, one epoch per round, the base model as reference)
and as many training pairs per round for each of: onpolicy runs first in every repeat and
plans ``prompts_per_round`` pairs a round, but a round trains every pair its planned prompts
make (the plan is sized by the yield seen so far, and an improving policy ties less, so later
rounds come out larger: 25, 36, 35 in the first run), so the other two then train as many
pairs per round as onpolicy did in that repeat (without onpolicy: ``prompts_per_round``):

1. **onpolicy**: ``onpolicy run`` through :class:`Runner` (strict, the merged hand-off), as
   ``python -m benchmarks demo`` runs it: the services sample, judge, pair, train and
   evaluate each round over Kafka.
2. **script**: the one-process recipe, written plainly below: sample the round's prompts
   with vLLM (the same server), judge them, best-vs-worst pairs (the judge service's rule),
   TRL's ``DPOTrainer`` on text rows, merge the LoRA, reload the weights into vLLM, repeat.
3. **online_dpo**: TRL's ``OnlineDPOTrainer`` (``trl.experimental.online_dpo``) with the
   constraints judge as its reward function; on the CPU it generates with transformers.
   TRL fixes it at 2 samples per prompt and one pair per prompt (ties included) and its loss
   is ``sigmoid`` or ``ipo`` only (no ``sft`` term): what it cannot share is recorded.

Every policy is evaluated by one function (:func:`evaluate`): the 48 held-out prompts
sampled through the same vLLM server (temperature 0.7, 64 tokens), scored by the same judge.
``eval_before`` is the base model's score and ``eval_after`` each system's last policy's,
both with ``final_samples`` samples per prompt; the curves (held-out reward vs wall time) use
each system's own per-version evaluations (onpolicy: the services' EvalResult; the others:
:func:`evaluate` with ``eval_samples``). ``wall_s`` is the time from the first prompt to
the last round's evaluated policy, the evaluations of v0..vR included for all three (the
onpolicy loop evaluates every version; start-up of the stack, services and imports is not
counted for any). Systems run one after the other: onpolicy first (it sets the pair
budget), the other two in an order rotated per repeat.

Results: ``benchmarks/results/peers.json``, the plot ``benchmarks/results/peers.png``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import statistics
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).parent
RESULTS = HERE / "results"
PLOT = RESULTS / "peers.png"
SYSTEMS = ("onpolicy", "script", "online_dpo")
DEFAULT_ROUNDS = 3
DEFAULT_REPEATS = 1
# Samples per held-out prompt for eval_before / eval_after: the demo's eval_samples (4); so
# the last per-version evaluation of the script and of OnlineDPO is their eval_after.
LABEL = "bench-peers"
EXAMPLES = 4  # answers kept per evaluation


# ---------------------------------------------------------------------------- pure parts
@dataclass
class Group:
    """One prompt's samples: texts, finish reasons, scores."""

    texts: list[str]
    finish: list[str]
    scores: list[float]


def best_worst(group: Group, tie_epsilon: float = 1e-9) -> tuple[int, int] | None:
    """The judge service's default pair rule (``best_worst``, ``finished="require"``,
    ``drop_ties``): the best answer that ended against the worst other answer; no pair when
    none ended, when they tie or when both texts are the same."""
    n = len(group.scores)
    if n < 2:
        return None
    eos = [f == "stop" for f in group.finish]
    pool = [i for i in range(n) if eos[i]]
    if not pool:
        return None
    s = group.scores
    best = max(pool, key=lambda i: (s[i], -i))
    worst = min((i for i in range(n) if i != best), key=lambda i: (s[i], -i))
    if s[worst] > s[best]:
        return None
    if s[best] - s[worst] <= tie_epsilon or group.texts[best] == group.texts[worst]:
        return None
    return best, worst


def ratio(a: float | None, b: float | None) -> float | None:
    """``a / b``, or None where it means nothing (b not positive)."""
    if a is None or b is None or b <= 0:
        return None
    return a / b


def pair_budget(cfg: Config, onpolicy: dict[str, Any] | None) -> list[int]:
    """Pairs per round the script and OnlineDPO train: onpolicy's of this repeat when it ran
    (so wall_vs_script compares the same pairs), else ``prompts_per_round``."""
    trained = (onpolicy or {}).get("pairs_per_round") or []
    if len(trained) == cfg.rounds and all(n > 0 for n in trained):
        return list(trained)
    return [cfg.prompts_per_round] * cfg.rounds


def round_ends(budget: Sequence[int], batch_size: int) -> list[int]:
    """OnlineDPO's global step at which each round's pairs are all trained (it trains one
    stream of prompts; a round ends where its cumulative pairs fill a batch)."""
    ends, total = [], 0
    for n in budget:
        total += n
        ends.append(math.ceil(total / batch_size))
    return ends


def gain_per_minute(before: float, after: float, wall_s: float) -> float:
    return (after - before) / (wall_s / 60.0)


def _spread(values: Sequence[float]) -> dict[str, float | None]:
    values = [v for v in values if v is not None]
    if not values:
        return {"mean": None, "sd": None, "min": None, "max": None}
    return {
        "mean": statistics.fmean(values),
        "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
        "min": min(values),
        "max": max(values),
    }


def finished(repeat: dict[str, Any], name: str) -> bool:
    """Whether ``name`` ran to its final evaluation in this repeat (not failed, not cut off)."""
    return (repeat.get(name) or {}).get("eval_after") is not None


def aggregate(size: dict[str, Any], runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per system the means over repeats (and their spread); the two ratios of the issue."""
    out: dict[str, Any] = {"size": size, "systems": {}, "repeats": runs}
    for name in SYSTEMS:
        mine = [r[name] for r in runs if finished(r, name)]
        if not mine:
            out["systems"][name] = {"error": [r.get(name, {}).get("error") for r in runs]}
            continue
        stats = {
            key: _spread([x[key] for x in mine])
            for key in ("wall_s", "pairs", "eval_before", "eval_after", "gain", "gain_per_minute")
        }
        out["systems"][name] = {k: v["mean"] for k, v in stats.items()} | {
            "spread": stats,
            "runs": len(mine),
        }
    s = out["systems"]

    def pick(name: str, key: str) -> float | None:
        return s.get(name, {}).get(key)

    out["gain_per_minute_vs_online_dpo"] = ratio(
        pick("onpolicy", "gain_per_minute"), pick("online_dpo", "gain_per_minute")
    )
    out["wall_vs_script"] = ratio(pick("onpolicy", "wall_s"), pick("script", "wall_s"))
    per_repeat = []
    for r in runs:
        row = {}
        try:
            row["gain_per_minute_vs_online_dpo"] = ratio(
                r["onpolicy"]["gain_per_minute"], r["online_dpo"]["gain_per_minute"]
            )
        except (KeyError, TypeError):
            row["gain_per_minute_vs_online_dpo"] = None
        try:
            row["wall_vs_script"] = ratio(r["onpolicy"]["wall_s"], r["script"]["wall_s"])
        except (KeyError, TypeError):
            row["wall_vs_script"] = None
        per_repeat.append(row)
    out["ratios_per_repeat"] = per_repeat
    out["goals"] = {
        "gain_per_minute_vs_online_dpo>=1.0": _goal(out["gain_per_minute_vs_online_dpo"], s, 1),
        "wall_vs_script<=1.05": None
        if out["wall_vs_script"] is None
        else out["wall_vs_script"] <= 1.05,
    }
    return out


def _goal(value: float | None, s: dict[str, Any], _: int) -> bool | None:
    if value is not None:
        return value >= 1.0
    on, off = s.get("onpolicy", {}).get("gain"), s.get("online_dpo", {}).get("gain")
    if on is not None and off is not None and off <= 0:
        return on > off  # the peer did not gain at all: met when onpolicy gained more
    return None


# ---------------------------------------------------------------------------- vLLM access
class Served:
    """The shared vLLM server: chat sampling and in-place weight reloads (dev mode)."""

    def __init__(self, url: str, model_name: str, base_model: Path):
        import httpx

        self.http = httpx.Client(base_url=url, timeout=600)
        self.model_name = model_name
        self.base_model = base_model
        self.initial_label = self.label()
        self.base_label = "base"  # onpolicy_sampler.weights.BASE_LABEL: the sampler's v0

    def label(self) -> str:
        return str(self.http.get("/weight_info").json().get("weight_version"))

    def reload(self, folder: Path | str, label: str) -> float:
        started = time.monotonic()
        body = {"method": "reload_weights", "kwargs": {"weights_path": str(folder)}}
        self.http.post("/collective_rpc", json=body).raise_for_status()
        self.http.post("/reset_prefix_cache").raise_for_status()
        self.http.post("/update_weight_version", json={"new_version": label}).raise_for_status()
        return time.monotonic() - started

    def restore_base(self) -> None:
        """Base weights, labelled as the onpolicy sampler labels its v0."""
        self.reload(self.base_model, self.base_label)

    def chat(self, messages: list[dict[str, str]], n: int, temperature: float, max_tokens: int):
        body = {
            "model": self.model_name,
            "messages": messages,
            "n": n,
            "temperature": temperature,
            "top_p": 1.0,
            "max_tokens": max_tokens,
        }
        response = self.http.post("/v1/chat/completions", json=body)
        response.raise_for_status()
        choices = sorted(response.json()["choices"], key=lambda c: c["index"])
        return [c["message"]["content"] or "" for c in choices], [
            c.get("finish_reason") or "" for c in choices
        ]


def score(prompt: Any, text: str, finish: str) -> float:
    """The constraints judge, as the judge service runs it for the instructions task."""
    from onpolicy import messages as m
    from onpolicy_judge.constraints import instructions

    return instructions(m.Completion(text=text, finish_reason=finish), prompt, partial=True)


def messages_of(prompt: Any) -> list[dict[str, str]]:
    return [{"role": x.role, "content": x.content} for x in prompt.messages]


def sample_groups(
    served: Served, prompts: Sequence[Any], n: int, temperature: float, max_tokens: int
) -> list[Group]:
    def one(p: Any) -> Group:
        texts, finish = served.chat(messages_of(p), n, temperature, max_tokens)
        return Group(texts, finish, [score(p, t, f) for t, f in zip(texts, finish, strict=True)])

    with ThreadPoolExecutor(max_workers=32) as pool:
        return list(pool.map(one, prompts))


def evaluate(served: Served, prompts: Sequence[Any], samples: int, cfg: Config) -> dict:
    """THE held-out evaluation, the same for every system: mean over prompts of the mean
    score of ``samples`` answers; the SE clustered by prompt."""
    started = time.monotonic()
    groups = sample_groups(served, prompts, samples, cfg.eval_temperature, cfg.max_tokens)
    per_prompt = [statistics.fmean(g.scores) for g in groups]
    mean = statistics.fmean(per_prompt)
    se = statistics.stdev(per_prompt) / math.sqrt(len(per_prompt)) if len(groups) > 1 else 0.0
    finished = statistics.fmean(f == "stop" for g in groups for f in g.finish)
    return {
        "reward": mean,
        "se": se,
        "finished": finished,
        "samples": samples,
        "seconds": time.monotonic() - started,
        # The first answer to the first few prompts, so a score can be read against its text
        # (OnlineDPO's policies scored 0 on answers that mostly ended: which gate failed?).
        "examples": [
            {"prompt": p.messages[-1].content, "answer": g.texts[0][:300], "score": g.scores[0]}
            for p, g in zip(prompts[:EXAMPLES], groups, strict=False)
        ],
    }


# The TrainingArguments both TRL trainers here share: CPU, fp32 as the trainer service on a
# CPU (TRL's default is bf16=True), no checkpoints, no reporting.
CPU_TRAINING_ARGS: dict[str, Any] = {
    "use_cpu": True,
    "bf16": False,
    "logging_steps": 1,
    "save_strategy": "no",
    "report_to": [],
    "disable_tqdm": True,
    "dataloader_num_workers": 0,
}


# ---------------------------------------------------------------------------- config
@dataclass
class Config:
    rounds: int
    prompts_per_round: int
    num_samples: int
    max_tokens: int
    temperature: float
    eval_temperature: float
    eval_samples: int
    final_samples: int
    eval_size: int
    learning_rate: float
    loss_types: list[str]
    beta: float
    batch_size: int
    max_length: int
    lora_r: int
    lora_alpha: int
    lora_dropout: float
    target_modules: list[str]
    seed: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def lora(self) -> Any:
        from onpolicy_trainer.dpo import lora_config

        return lora_config(self)  # the trainer's own LoRA (it reads the same four fields)


def make_config(run_settings: Any, final_samples: int) -> Config:
    from onpolicy_trainer.settings import TrainerSettings

    t = TrainerSettings(**run_settings.trainer)  # the demo's trainer values over the defaults
    s = run_settings
    return Config(
        rounds=s.rounds,
        prompts_per_round=s.prompts_per_round,
        num_samples=s.num_samples,
        max_tokens=s.max_tokens,
        temperature=s.temperature,
        eval_temperature=s.eval_temperature,
        eval_samples=s.eval_samples,
        final_samples=final_samples,
        eval_size=s.eval_size,
        learning_rate=t.learning_rate,
        loss_types=t.loss_types,
        beta=t.beta,
        batch_size=t.per_device_batch_size,
        max_length=t.max_length,
        lora_r=t.lora_r,
        lora_alpha=t.lora_alpha,
        lora_dropout=t.lora_dropout,
        target_modules=list(t.target_modules),
        seed=s.seed,
    )


def merge_to(base_model: Path, peft_model: Any, folder: Path) -> Path:
    """The LoRA folded into float32 base weights, saved in the base's bfloat16 (as the
    trainer service's merged hand-off does)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter = folder.with_name(folder.name + "-adapter")
    peft_model.save_pretrained(adapter, selected_adapters=["default"])
    base = AutoModelForCausalLM.from_pretrained(base_model, dtype=torch.float32)
    merged = PeftModel.from_pretrained(base, str(adapter)).merge_and_unload().to(torch.bfloat16)
    merged.save_pretrained(folder, safe_serialization=True)
    AutoTokenizer.from_pretrained(base_model).save_pretrained(folder)
    return adapter


# ---------------------------------------------------------------------------- 1. onpolicy
def run_onpolicy(ctx: dict[str, Any]) -> dict[str, Any]:
    from onpolicy.run.runner import Runner
    from onpolicy.run.settings import RunSettings
    from onpolicy.settings import load_settings

    served: Served = ctx["served"]
    served.restore_base()
    points: list[tuple[float, float]] = []
    clock: dict[str, float] = {}

    def status(message: str, *args: Any, **kwargs: Any) -> None:
        now = time.monotonic()
        if message.startswith("[onpolicy] published"):
            clock["t0"] = now
        elif message.startswith("[onpolicy] v") and "eval reward" in message:
            value = message.split("eval reward", 1)[1].split(",", 1)[0].strip()
            if value != "-" and "t0" in clock:
                points.append((now - clock["t0"], float(value)))

    settings = load_settings(
        RunSettings,
        **ctx["extra"],
        external_stack=True,
        kafka=ctx["stack"].kafka,
        vllm_url=ctx["stack"].vllm_url,
        model=ctx["stack"].model_path,
        runs_dir=ctx["tmp"] / "runs",
        run_id=f"peers-r{ctx['repeat']}-{int(time.time())}",
    )
    runner = Runner(settings, ctx["stack_settings"], status=status)
    report = runner.run()
    if report.get("error"):
        raise RuntimeError(f"onpolicy run failed: {report['error']}")
    pairs = sum(r["pairs"] for r in report["lineages"]["onpolicy"][:-1])
    last = report["lineages"]["onpolicy"][-1]["policy_version"]
    store = runner.run_dir / "onpolicy" / "checkpoints"
    merged = store / f"merged-v{last}"
    if not (merged / "config.json").exists():
        raise RuntimeError(f"no merged weights of v{last} in {store}: {sorted(store.iterdir())}")
    served.reload(merged, f"{LABEL}-onpolicy-final")
    final = evaluate(served, ctx["heldout"], ctx["cfg"].final_samples, ctx["cfg"])
    served.restore_base()
    return {
        "wall_s": report["loop_s"],
        "pairs": pairs,
        "pairs_per_round": [r["pairs"] for r in report["lineages"]["onpolicy"][:-1]],
        "final_version": last,
        "curve": points,
        "curve_source": "the services' held-out EvalResult per version (eval_samples)",
        "eval_final": final,
        "rounds_detail": [
            {k: r.get(k) for k in ("sampling_s", "judging_s", "training_s", "loading_s", "pairs")}
            for r in report["lineages"]["onpolicy"]
        ],
        "run_dir": str(runner.run_dir),
    }


# ---------------------------------------------------------------------------- 2. script
def run_script(ctx: dict[str, Any]) -> dict[str, Any]:
    """The one-process recipe: sample with vLLM, judge, pair, DPOTrainer, reload, repeat."""
    import torch
    from datasets import Dataset
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    cfg: Config = ctx["cfg"]
    served: Served = ctx["served"]
    base = ctx["stack"].model_path
    train = ctx["train"]
    work = ctx["tmp"] / f"script-r{ctx['repeat']}"
    served.restore_base()
    tokenizer = AutoTokenizer.from_pretrained(base)
    points: list[tuple[float, float]] = []
    timings: list[dict[str, float]] = []
    eval_s = 0.0
    cursor = 0
    previous_adapter: Path | None = None
    pairs_total = 0

    t0 = time.monotonic()
    ev = evaluate(served, ctx["heldout"], cfg.eval_samples, cfg)
    eval_s += ev["seconds"]
    points.append((time.monotonic() - t0, ev["reward"]))
    budget = ctx["budget"]
    for r in range(cfg.rounds):
        t_round = time.monotonic()
        rows: list[dict[str, Any]] = []
        sampled = 0
        want = budget[r]
        while len(rows) < want and sampled < len(train):
            batch = max(4, want - len(rows)) if rows or sampled else want
            prompts = [train[(cursor + i) % len(train)] for i in range(batch)]
            cursor += batch
            sampled += batch
            groups = sample_groups(
                served, prompts, cfg.num_samples, cfg.temperature, cfg.max_tokens
            )
            for p, g in zip(prompts, groups, strict=True):
                pair = best_worst(g)
                if pair and len(rows) < want:
                    c, j = pair
                    rows.append(
                        {
                            "prompt": messages_of(p),
                            "chosen": [{"role": "assistant", "content": g.texts[c]}],
                            "rejected": [{"role": "assistant", "content": g.texts[j]}],
                        }
                    )
        t_sampled = time.monotonic()
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        config = DPOConfig(
            output_dir=str(work / "scratch"),
            beta=cfg.beta,
            loss_type=list(cfg.loss_types),
            learning_rate=cfg.learning_rate,
            num_train_epochs=1,
            per_device_train_batch_size=cfg.batch_size,
            max_length=cfg.max_length,
            seed=cfg.seed,
            **CPU_TRAINING_ARGS,
        )
        trainer = DPOTrainer(
            model=model,
            args=config,
            train_dataset=Dataset.from_list(rows),
            processing_class=tokenizer,
            peft_config=cfg.lora(),
        )
        if previous_adapter is not None:  # continue the policy; the reference stays the base
            weights = load_file(str(previous_adapter / "adapter_model.safetensors"))
            set_peft_model_state_dict(trainer.model, weights, adapter_name="default")
        trainer.train()
        t_trained = time.monotonic()
        merged = work / f"merged-v{r + 1}"
        previous_adapter = merge_to(base, trainer.model, merged)
        reload_s = served.reload(merged, f"{LABEL}-script-v{r + 1}")
        t_loaded = time.monotonic()
        pairs_total += len(rows)
        ev = evaluate(served, ctx["heldout"], cfg.eval_samples, cfg)
        eval_s += ev["seconds"]
        points.append((time.monotonic() - t0, ev["reward"]))
        timings.append(
            {
                "pairs": len(rows),
                "prompts_sampled": sampled,
                "sampling_s": t_sampled - t_round,
                "training_s": t_trained - t_sampled,
                "merge_reload_s": t_loaded - t_trained,
                "reload_s": reload_s,
                "eval_s": ev["seconds"],
            }
        )
        del trainer, model
    wall = time.monotonic() - t0
    final = ev if cfg.final_samples == cfg.eval_samples else None
    final = final or evaluate(served, ctx["heldout"], cfg.final_samples, cfg)
    served.restore_base()
    return {
        "wall_s": wall,
        "wall_without_eval_s": wall - eval_s,
        "pairs": pairs_total,
        "pairs_per_round": [t["pairs"] for t in timings],
        "curve": points,
        "curve_source": "evaluate() per version (eval_samples)",
        "eval_final": final,
        "rounds_detail": timings,
    }


# ---------------------------------------------------------------------------- 3. OnlineDPO
def run_online_dpo(ctx: dict[str, Any]) -> dict[str, Any]:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl.experimental.online_dpo import OnlineDPOConfig, OnlineDPOTrainer

    cfg: Config = ctx["cfg"]
    served: Served = ctx["served"]
    base = ctx["stack"].model_path
    work = ctx["tmp"] / f"online-r{ctx['repeat']}"
    ends = round_ends(ctx["budget"], cfg.batch_size)
    prompts = [ctx["train"][i % len(ctx["train"])] for i in range(sum(ctx["budget"]))]
    by_text = {p.messages[-1].content: p for p in prompts}
    tokenizer = AutoTokenizer.from_pretrained(base)
    eos_ids = {tokenizer.eos_token_id}
    judged: list[float] = []
    ties = 0

    def constraints_reward(prompts, completions, completion_ids, **kwargs) -> list[float]:
        nonlocal ties
        out = []
        for conv, comp, ids in zip(prompts, completions, completion_ids, strict=True):
            p = by_text[conv[-1]["content"]]
            finish = "stop" if any(t in eos_ids for t in ids) else "length"
            out.append(score(p, comp[0]["content"], finish))
        half = len(out) // 2
        ties += sum(abs(a - b) <= 1e-9 for a, b in zip(out[:half], out[half:], strict=True))
        judged.extend(out)
        return out

    dataset = Dataset.from_list([{"prompt": messages_of(p)} for p in prompts])
    points: list[tuple[float, float]] = []
    timings: list[dict[str, float]] = []
    clock: dict[str, Any] = {"eval_s": 0.0}

    def checkpoint(model: Any, version: int) -> None:
        t = time.monotonic()
        if version == 0:
            served.restore_base()
        else:
            merge_to(base, model, work / f"merged-v{version}")
            served.reload(work / f"merged-v{version}", f"{LABEL}-online-v{version}")
        t_loaded = time.monotonic()
        ev = evaluate(served, ctx["heldout"], cfg.eval_samples, cfg)
        clock["eval_s"] += ev["seconds"]
        clock["last"] = ev
        points.append((time.monotonic() - clock["t0"], ev["reward"]))
        timings.append({"merge_reload_s": t_loaded - t, "eval_s": ev["seconds"]})

    class EveryRound(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.global_step in ends or state.global_step == state.max_steps:
                version = 1 + sum(end < state.global_step for end in ends)
                if version > len(points) - 1:
                    checkpoint(model, min(version, len(ends)))
            return control

    config = OnlineDPOConfig(
        output_dir=str(work / "scratch"),
        beta=cfg.beta,
        loss_type="sigmoid",  # TRL's OnlineDPO has sigmoid or ipo, no sft term
        learning_rate=cfg.learning_rate,
        num_train_epochs=1,
        per_device_train_batch_size=cfg.batch_size,
        max_new_tokens=cfg.max_tokens,
        max_length=cfg.max_length,
        temperature=cfg.temperature,
        top_p=1.0,
        top_k=0,
        # TRL's default (True, as in DPOConfig, which onpolicy and the script keep) turns the KV
        # cache off in generate while the model trains: every token recomputes the whole
        # sequence. Off here, so the peer is not slowed by it (memory is no issue at 135M).
        gradient_checkpointing=False,
        seed=cfg.seed,
        **CPU_TRAINING_ARGS,
    )
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    trainer = OnlineDPOTrainer(
        model=model,
        reward_funcs=constraints_reward,
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=cfg.lora(),
        callbacks=[EveryRound()],
    )
    clock["t0"] = time.monotonic()
    checkpoint(trainer.model, 0)
    trainer.train()
    wall = time.monotonic() - clock["t0"]
    final = clock["last"] if cfg.final_samples == cfg.eval_samples else None
    final = final or evaluate(served, ctx["heldout"], cfg.final_samples, cfg)
    served.restore_base()
    margins = [e["rewards/margins"] for e in trainer.state.log_history if "rewards/margins" in e]
    return {
        "wall_s": wall,
        "wall_without_eval_s": wall - clock["eval_s"],
        "pairs": len(prompts),  # one pair per prompt, ties included (TRL trains them too)
        "tied_pairs": ties,
        "samples_per_prompt": 2,
        "train_reward_mean": statistics.fmean(judged) if judged else None,
        # Its own samples' scores (temperature 1.0, transformers) round by round: 2 answers to
        # each of a step's batch_size prompts.
        "train_reward_per_round": [
            statistics.fmean(chunk)
            if (chunk := judged[2 * cfg.batch_size * a : 2 * cfg.batch_size * b])
            else None
            for a, b in zip([0, *ends[:-1]], ends, strict=True)
        ],
        "curve": points,
        "curve_source": "evaluate() per version (eval_samples)",
        "eval_final": final,
        "rounds_detail": timings,
        "rewards_margins_mean": statistics.fmean(margins) if margins else None,
        "steps": trainer.state.global_step,
    }


RUNNERS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "onpolicy": run_onpolicy,
    "script": run_script,
    "online_dpo": run_online_dpo,
}


# ---------------------------------------------------------------------------- plot
def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"onpolicy": "tab:blue", "script": "tab:green", "online_dpo": "tab:red"}
    fig, ax = plt.subplots(figsize=(7, 4.4))
    for i, run in enumerate(result["repeats"]):
        for name in SYSTEMS:
            one = run.get(name) or {}
            if not one.get("curve"):
                continue
            xs = [t / 60 for t, _ in one["curve"]]
            ys = [y for _, y in one["curve"]]
            label = name if i == 0 else None
            ax.plot(xs, ys, color=colors[name], marker="o", alpha=0.8, label=label)
            if one.get("eval_after") is not None:
                ax.plot(xs[-1], one["eval_after"], color=colors[name], marker="*", ms=13)
    ax.set(
        title="Held-out constraint accuracy vs wall time (stars: shared final eval)",
        xlabel="wall time from the first prompt (min), 2 CPU cores",
        ylabel="share of constraints met (48 held-out prompts)",
    )
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------- run
def summary_text(result: dict[str, Any]) -> str:
    size = result["size"]
    s = result["systems"]
    lines = [
        f"**Peers** (`python -m benchmarks peers`; instructions task, {size['rounds']} rounds x "
        f"{size['prompts_per_round']} pairs, {size['repeats']} repeat(s), held-out "
        f"{size['eval_size']} prompts x {size['final_samples']} samples):",
        "",
        "| system | wall (min) | pairs | held-out before | after | gain/min |",
        "|---|---|---|---|---|---|",
    ]
    for name in SYSTEMS:
        x = s.get(name, {})
        if x.get("eval_after") is None:
            lines.append(f"| {name} | failed | | | | |")
            continue
        sd = x["spread"]["eval_after"]["sd"]
        lines.append(
            f"| {name} | {x['wall_s'] / 60:.1f} | {x['pairs']:.0f} | {x['eval_before']:.3f} | "
            f"{x['eval_after']:.3f}"
            + (f" (sd {sd:.3f})" if x["runs"] > 1 else "")
            + f" | {x['gain_per_minute']:+.4f} |"
        )

    def fmt(v: float | None) -> str:
        return "n/a" if v is None else f"{v:.2f}"

    lines += [
        "",
        f"gain_per_minute_vs_online_dpo **{fmt(result['gain_per_minute_vs_online_dpo'])}** "
        f"(goal >= 1.0), wall_vs_script **{fmt(result['wall_vs_script'])}** (goal <= 1.05). "
        "Plot `benchmarks/results/peers.png`; details and caveats in "
        "`benchmarks/results/peers.json`.",
        "",
        "![held-out reward vs wall time](benchmarks/results/peers.png)",
    ]
    return "\n".join(lines)


# Ports and state folder of the benchmark's own stack (not the default stack's): fixed, so
# that a run started with ONPOLICY_PEERS_KEEP_STACK=1 leaves Kafka and vLLM up for the next.
KAFKA_PORT, CONTROLLER_PORT, VLLM_PORT = 19392, 19393, 18392
VLLM_READY_S = 1500.0  # dev mode compiles at start: ~130 s idle, over 300 s on a loaded machine


@contextlib.contextmanager
def peers_stack(base: Any, stack_settings: Any) -> Iterator[Any]:
    """Kafka and vLLM (merged hand-off: dev mode) for every system, started once."""
    from onpolicy.run.runner import Stack
    from onpolicy.stack import KafkaBroker, VllmServer, ensure_default_model

    keep = os.environ.get("ONPOLICY_PEERS_KEEP_STACK") == "1"
    broker = KafkaBroker(stack_settings)
    broker_started = not broker.process.running()
    model = ensure_default_model(stack_settings)
    server = VllmServer(stack_settings, model)
    server_started = not server.process.running()
    try:
        broker.start()
        kafka = base.kafka.model_copy(update={"bootstrap_servers": broker.bootstrap})
        server.start(timeout=VLLM_READY_S)
        yield Stack(kafka, server.url, stack_settings.served_model_name, model, None)
    finally:
        if not keep:
            if server_started:
                server.stop()
            if broker_started:
                broker.stop()


PARTIAL = RESULTS / "peers-partial.json"


def save_partial(size: dict[str, Any], runs: list[dict[str, Any]]) -> None:
    """What ran so far, in case the run is cut short (``--resume`` goes on from it)."""
    RESULTS.mkdir(exist_ok=True)
    PARTIAL.write_text(json.dumps(aggregate(size, runs), indent=2) + "\n")


def resumed_runs(
    partial: dict[str, Any], size: dict[str, Any], only: list[str]
) -> list[dict[str, Any]]:
    """The repeats of a cut-off run that finished every system this run asks for.

    A repeat takes about 25 minutes on 2 cores, so a run cut short keeps what it finished; the
    repeat cut in the middle is run again. Refuses a partial run of another size (other rounds,
    pairs or held-out set): its figures would not compare.
    """
    theirs = partial.get("size") or {}
    clash = {k: (theirs[k], v) for k, v in size.items() if k in theirs and theirs[k] != v}
    if clash:
        raise ValueError(f"{PARTIAL} is from a run of another size (theirs, ours): {clash}")
    done = []
    for r in partial.get("repeats", []):
        if all(finished(r, n) for n in only):
            done.append(r)
        else:
            break  # repeats are numbered in order: go on from the first unfinished one
    return done


def run(args: Any) -> dict[str, Any]:
    from onpolicy.run.prompts import load_prompts
    from onpolicy.run.settings import DEMO_DEFAULTS, RunSettings
    from onpolicy.settings import load_settings
    from onpolicy.stack import StackSettings

    rounds = getattr(args, "rounds", None) or DEFAULT_ROUNDS
    # The demo's pairs per round (40) unless the command line names a number.
    ppr = getattr(args, "prompts_per_round", None) or DEMO_DEFAULTS["prompts_per_round"]
    repeats = getattr(args, "repeats", None) or DEFAULT_REPEATS
    eval_size = getattr(args, "eval_size", None) or 48
    only = getattr(args, "systems", None) or list(SYSTEMS)
    if getattr(args, "quick", False):
        rounds, ppr, repeats, eval_size = 1, 4, 1, 8
    # The demo's settings (task, prompt reuse, held-out samples): the script cycles through the
    # prompt set as well.
    extra = DEMO_DEFAULTS | {"rounds": rounds, "prompts_per_round": ppr, "eval_size": eval_size}
    base = load_settings(RunSettings, **extra)
    final_samples = getattr(args, "final_samples", None) or base.eval_samples
    cfg = make_config(base, final_samples)
    tmp = Path(tempfile.mkdtemp(prefix="bench-peers-"))
    stack_settings = load_settings(
        StackSettings,
        kafka_port=KAFKA_PORT,
        kafka_controller_port=CONTROLLER_PORT,
        vllm_port=VLLM_PORT,
        handoff="merged",
    )
    stack_settings.state_dir = stack_settings.home / "bench-peers-stack"
    train = load_prompts(base.prompts).prompts
    heldout = load_prompts(base.eval_prompts).prompts[:eval_size]
    size = {
        "rounds": rounds,
        "prompts_per_round": ppr,
        "eval_size": eval_size,
        "eval_samples": cfg.eval_samples,
        "final_samples": final_samples,
        "num_samples": cfg.num_samples,
        "max_tokens": cfg.max_tokens,
        "temperature": cfg.temperature,
        "eval_temperature": cfg.eval_temperature,
    }
    runs: list[dict[str, Any]] = []
    if getattr(args, "resume", False) and PARTIAL.exists():
        runs = resumed_runs(json.loads(PARTIAL.read_text()), size, only)
        print(f"[peers] resuming: {len(runs)} finished repeat(s) from {PARTIAL}", flush=True)
    resumed = len(runs)
    started = time.monotonic()
    try:
        with peers_stack(base, stack_settings) as stack:
            served = Served(stack.vllm_url, stack.served_model_name, stack.model_path)
            ctx = {
                "cfg": cfg,
                "served": served,
                "stack": stack,
                "stack_settings": stack_settings,
                "extra": extra,
                "tmp": tmp,
                "train": train,
                "heldout": heldout,
            }
            for rep in range(len(runs), repeats):
                ctx["repeat"] = rep
                served.restore_base()
                before = evaluate(served, heldout, cfg.final_samples, cfg)
                one: dict[str, Any] = {"repeat": rep, "eval_base": before}
                peers = SYSTEMS[1:]
                order = ["onpolicy", *(peers[(i + rep) % len(peers)] for i in range(len(peers)))]
                one["order"] = [n for n in order if n in only]
                for name in one["order"]:
                    ctx["budget"] = one["budget"] = pair_budget(cfg, one.get("onpolicy"))
                    print(f"[peers] repeat {rep}: {name}", flush=True)
                    load_before = os.getloadavg()[0]
                    try:
                        res = RUNNERS[name](ctx)
                    except Exception as exc:  # report it and go on with the others
                        print(f"[peers] {name} failed: {exc!r}", flush=True)
                        one[name] = {
                            "error": f"{type(exc).__name__}: {exc}",
                            "traceback": traceback.format_exc()[-3000:],
                        }
                        with contextlib.suppress(Exception):
                            served.restore_base()
                        continue
                    res["load_avg_1min"] = [load_before, os.getloadavg()[0]]
                    res["eval_before"] = before["reward"]
                    res["eval_after"] = res["eval_final"]["reward"]
                    res["gain"] = res["eval_after"] - res["eval_before"]
                    res["gain_per_minute"] = gain_per_minute(
                        res["eval_before"], res["eval_after"], res["wall_s"]
                    )
                    one[name] = res
                    save_partial(size, [*runs, one])
                    print(
                        f"[peers] {name}: {res['wall_s']:.0f}s, {res['pairs']} pairs, "
                        f"{res['eval_before']:.3f} -> {res['eval_after']:.3f}",
                        flush=True,
                    )
                runs.append(one)
                save_partial(size, runs)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    size["repeats"] = len(runs)
    result = aggregate(size, runs)
    result["hyper_parameters"] = {
        k: getattr(cfg, k)
        for k in (
            "learning_rate",
            "loss_types",
            "beta",
            "batch_size",
            "max_length",
            "lora_r",
            "lora_alpha",
            "target_modules",
        )
    }
    result["differences"] = {
        "online_dpo": "TRL fixes 2 samples per prompt (the others 4) and one pair per prompt, "
        "ties included; loss sigmoid only (no sft term); one trainer (one AdamW and one "
        "linear LR decay) over all rounds; generation with transformers, not vLLM; "
        "gradient_checkpointing off (TRL's default on disables the KV cache in its generate)",
        "script": "text rows re-tokenized by TRL (an EOS appended to every answer, cut-off "
        "ones too); onpolicy trains the sampled token ids",
    }
    result["metric"] = (
        "held-out reward of the instructions judge (partial): share of a prompt's constraints "
        "met, 0 when cut off; eval_before/eval_after from evaluate() with final_samples"
    )
    result["wall_s"] = time.monotonic() - started
    result["resumed_repeats"] = resumed  # taken from a cut-off run's peers-partial.json
    for name in SYSTEMS:  # the flat fields, per system
        x = result["systems"].get(name, {})
        result[name] = {k: x.get(k) for k in ("wall_s", "pairs", "eval_before", "eval_after")}
    try:
        plot(result, PLOT)
    except Exception as exc:  # the figures matter more than the picture
        result["plot_error"] = repr(exc)
    try:
        result["summary"] = summary_text(result)
    except Exception as exc:
        result["summary_error"] = repr(exc)
    return result
