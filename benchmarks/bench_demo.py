"""The demo, measured: held-out constraint accuracy before and after, on- vs off-policy.

`make demo`'s configuration (or the YAML file ONPOLICY_CONFIG names) run through ``Runner``
for ``--seeds`` seeds (default 3), each with ``compare_offpolicy`` (as many pairs per round,
all sampled by the initial policy). The bench starts one local stack for all runs and keeps
its broker up until every run's held-out groups are read back from Kafka, so the figures are
computed per sample and per prompt, not only from the report's means:

- ``eval_before`` / ``eval_after``: the held-out reward (the judge's score: for the
  instructions task, the share of a prompt's constraints met, IFEval's instruction-level
  accuracy) of v0 and of the last policy, mean over seeds; ``prompt_pass_*`` the share of
  answers meeting every constraint (IFEval's prompt-level accuracy); ``answered_*`` the share
  of answers that name one of the question's reference terms (the judge's ``mentions`` gate:
  the answer's content, not its form) and ``words_*`` the answers' mean length in words, so a
  gain bought by short non-answers shows.
- ``eval_se``: the standard error of one evaluation's mean, clustered by prompt (a prompt's
  samples are not independent); ``gain_se``: that of the gain (before and after are paired by
  prompt: the SE of the per-prompt differences), mean over seeds; ``mean_gain_se``: the SE of
  the gain's mean over the seeds (they sample and train independently).
- ``wall_s``: the on-policy run's wall time (stack start excluded, the bench starts it once).

Results: ``benchmarks/results/demo.json``, the plot ``docs/demo-instructions.png``.
"""

from __future__ import annotations

import math
import os
import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from onpolicy import messages as m
from onpolicy.bus import read_topic
from onpolicy.run.runner import Runner, local_stack
from onpolicy.run.settings import DEMO_DEFAULTS, RunSettings
from onpolicy.settings import load_settings
from onpolicy.stack import StackSettings
from onpolicy_judge import constraints

PLOT = Path(__file__).parent.parent / "docs" / "demo-instructions.png"


def eval_samples(kafka: Any, topic: str) -> dict[int, dict[str, dict[str, Any]]]:
    """Held-out groups of one lineage: policy version -> prompt -> scores, answers (every
    version samples the held-out prompts of the `heldout` topic once)."""
    out: dict[int, dict[str, dict[str, Any]]] = defaultdict(dict)
    seen = set()
    for record in read_topic(kafka, topic, m.ScoredGroup, timeout_s=120):
        g = record.message
        p = g.group.prompt
        if p.dataset_split != "eval" or g.id in seen:
            continue
        seen.add(g.id)
        out[g.group.policy_version][p.id.rsplit(":", 2)[0]] = {
            "question": p.messages[0].content if p.messages else p.text,
            "format": p.metadata.get("format", ""),
            "constraints": p.metadata.get("constraints", ""),
            "scores": list(g.scores),
            "answers": [c.text for c in g.group.completions],
            "policy_version": g.group.policy_version,
        }
    return out


def _answered(answer: str, spec: str) -> bool:
    """The answer names a reference term of its question (True where the prompt has none)."""
    gates = [(k, a) for k, a in constraints.parse(spec) if k in constraints.GATES] if spec else []
    return all(constraints.CHECKS[k](answer, a) for k, a in gates)


def _mean_se(values: list[float]) -> tuple[float, float]:
    mean = statistics.fmean(values)
    se = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else 0.0
    return mean, se


def summarise(evals: dict[int, dict[str, dict[str, Any]]]) -> dict[str, Any]:
    """Per evaluation: mean reward, prompt-level pass rate, clustered SEs; the paired gain."""
    rounds = []
    for r in sorted(evals):
        prompts = evals[r]
        per_prompt = [statistics.fmean(x["scores"]) for x in prompts.values()]
        passed = [statistics.fmean(s >= 1.0 for s in x["scores"]) for x in prompts.values()]
        mean, se = _mean_se(per_prompt)
        pass_rate, pass_se = _mean_se(passed)
        by_format: dict[str, list[float]] = defaultdict(list)
        for x in prompts.values():
            by_format[x["format"]] += [float(s >= 1.0) for s in x["scores"]]
        answers = [(a, x["constraints"]) for x in prompts.values() for a in x["answers"]]
        rounds.append(
            {
                "round": r,
                "answered": statistics.fmean(_answered(a, spec) for a, spec in answers),
                "words": statistics.fmean(len(constraints.words(a)) for a, _ in answers),
                "reward": mean,
                "reward_se": se,
                "prompt_pass": pass_rate,
                "prompt_pass_se": pass_se,
                "prompt_pass_by_format": {f: statistics.fmean(v) for f, v in by_format.items()},
                "samples": sum(len(x["scores"]) for x in prompts.values()),
            }
        )
    first, last = min(evals), max(evals)
    common = evals[first].keys() & evals[last].keys()
    diffs = [
        statistics.fmean(evals[last][k]["scores"]) - statistics.fmean(evals[first][k]["scores"])
        for k in common
    ]
    gain, gain_se = _mean_se(diffs) if diffs else (None, None)
    return {"rounds": rounds, "gain": gain, "gain_se": gain_se}


def examples(evals: dict[int, dict[str, dict[str, Any]]], count: int = 6) -> list[dict]:
    """Before/after answers (first sample) of the first held-out prompt of each format."""
    first, last = min(evals), max(evals)
    picked, formats = [], set()
    for key, before in evals[first].items():
        if before["format"] in formats or key not in evals[last]:
            continue
        formats.add(before["format"])
        after = evals[last][key]
        picked.append(
            {
                "question": before["question"],
                "before": before["answers"][0],
                "before_score": before["scores"][0],
                "after": after["answers"][0],
                "after_score": after["scores"][0],
            }
        )
    return picked[:count]


def plot(runs: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for lineage, color in (("onpolicy", "tab:blue"), ("offpolicy", "tab:orange")):
        curves = [[r["reward"] for r in run[lineage]["rounds"]] for run in runs if run.get(lineage)]
        for ys in curves:
            ax.plot(range(len(ys)), ys, color=color, alpha=0.35, marker=".")
        if curves:
            n = min(len(c) for c in curves)
            mean = [statistics.fmean(c[i] for c in curves) for i in range(n)]
            ax.plot(range(n), mean, color=color, marker="o", lw=2.2, label=f"{lineage} (mean)")
    ax.set(
        title="Held-out constraint accuracy (each seed thin, mean bold)",
        xlabel="policy version (DPO rounds)",
        ylabel="share of constraints met",
    )
    ax.grid(alpha=0.3)
    ax.legend()
    ax.xaxis.get_major_locator().set_params(integer=True)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(args: Any, compare_offpolicy: bool = True) -> dict[str, Any]:
    seeds = getattr(args, "seeds", None) or 3
    # ONPOLICY_HANDOFF=lora: the same demo with the LoRA hand-off (the wall time before the
    # merged hand-off), on-policy only, written beside the default as demo-lora.json.
    lora = os.environ.get("ONPOLICY_HANDOFF") == "lora"
    compare_offpolicy = compare_offpolicy and not lora
    extra: dict[str, Any] = {}
    if args.quick:
        extra |= {"rounds": 1, "prompts_per_round": 16, "eval_size": 16}
    base = load_settings(RunSettings, **extra)
    # The demo's defaults (task, prompt reuse) where the YAML names none.
    if missing := {k: v for k, v in DEMO_DEFAULTS.items() if k not in base.model_fields_set}:
        extra |= missing
        base = load_settings(RunSettings, **extra)
    stack_settings = load_settings(StackSettings)
    runs_dir = Path(tempfile.mkdtemp(prefix="bench-demo-"))
    runs = []
    with local_stack(base, stack_settings, lambda *a, **k: None) as stack:
        for seed in range(seeds):
            settings = load_settings(
                RunSettings,
                **extra,
                seed=seed,
                compare_offpolicy=compare_offpolicy,
                external_stack=True,
                kafka=stack.kafka,
                vllm_url=stack.vllm_url,
                model=stack.model_path,
                runs_dir=runs_dir,
                run_id=f"seed{seed}-{int(time.time())}",
            )
            runner = Runner(settings, stack_settings, status=lambda *a, **k: None)
            report = runner.run()
            one: dict[str, Any] = {"seed": seed, "run_dir": str(runner.run_dir)}
            one["loop_s"] = report["loop_s"]
            one["pairs"] = [r["pairs"] for r in report["lineages"]["onpolicy"][:-1]]
            for lineage, suffix in (("onpolicy", ""), ("offpolicy", "-off")):
                evals = eval_samples(stack.kafka, f"onpolicy.{runner.run_id}{suffix}.scored")
                if evals:
                    one[lineage] = summarise(evals)
                    if lineage == "onpolicy":
                        one["examples"] = examples(evals)
            runs.append(one)
            print(
                f"seed {seed}: {one['onpolicy']['rounds'][0]['reward']:.3f} -> "
                f"{one['onpolicy']['rounds'][-1]['reward']:.3f}",
                flush=True,
            )
    if lora:
        result = aggregate(base, runs)
        result["variant"] = "lora"
        result["summary"] = (
            f"**Demo with the LoRA hand-off** (`ONPOLICY_HANDOFF=lora python -m benchmarks "
            f"demo --seeds {len(runs)}`): on-policy run {result['wall_s'] / 60:.1f} min, "
            f"held-out {result['eval_before']:.3f} -> {result['eval_after']:.3f}."
        )
        return result
    plot(runs, PLOT)
    return aggregate(base, runs)


def aggregate(settings: RunSettings, runs: list[dict[str, Any]]) -> dict[str, Any]:
    def stat(lineage: str, pick) -> tuple[float | None, float | None]:
        values = [pick(r[lineage]) for r in runs if r.get(lineage)]
        if not values:
            return None, None
        return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)

    before, _ = stat("onpolicy", lambda s: s["rounds"][0]["reward"])
    after, after_sd = stat("onpolicy", lambda s: s["rounds"][-1]["reward"])
    on_gain, on_sd = stat("onpolicy", lambda s: s["gain"])
    off_gain, off_sd = stat("offpolicy", lambda s: s["gain"])
    pass_before, _ = stat("onpolicy", lambda s: s["rounds"][0]["prompt_pass"])
    pass_after, _ = stat("onpolicy", lambda s: s["rounds"][-1]["prompt_pass"])
    answered_before, _ = stat("onpolicy", lambda s: s["rounds"][0].get("answered"))
    answered_after, _ = stat("onpolicy", lambda s: s["rounds"][-1].get("answered"))
    words_before, _ = stat("onpolicy", lambda s: s["rounds"][0].get("words"))
    words_after, _ = stat("onpolicy", lambda s: s["rounds"][-1].get("words"))
    wall = statistics.fmean(r["loop_s"] for r in runs)
    eval_se = statistics.fmean(r["onpolicy"]["rounds"][-1]["reward_se"] for r in runs)
    gain_se = statistics.fmean(r["onpolicy"]["gain_se"] for r in runs)
    n = len(runs)
    # The seeds sample and train independently: the SE of their mean gain.
    mean_gain_se = math.sqrt(sum(r["onpolicy"]["gain_se"] ** 2 for r in runs)) / n
    spread = f" (sd over {n} seeds {on_sd:.3f})" if n > 1 else " (one seed)"
    off = (
        f"; **off-policy** (as many pairs, all sampled by v0) {off_gain:+.3f}"
        + (f" (sd {off_sd:.3f})" if n > 1 else "")
        if off_gain is not None
        else ""
    )
    summary = (
        f"**Demo** (`python -m benchmarks demo`; {settings.task} task, {settings.rounds} rounds "
        f"x {settings.prompts_per_round} prompts, N={settings.num_samples}, "
        f"{settings.eval_size} held-out prompts x {settings.eval_samples}): held-out "
        f"constraint accuracy **{before:.3f} -> {after:.3f}** (gain **{on_gain:+.3f}**, SE of "
        f"the gain {gain_se:.3f} per run, paired by prompt; {mean_gain_se:.3f} of the mean "
        f"over {n} seeds){spread}{off}; answers meeting every "
        f"constraint {pass_before:.0%} -> {pass_after:.0%}; answers naming a reference term "
        f"{answered_before:.0%} -> {answered_after:.0%}, {words_before:.0f} -> "
        f"{words_after:.0f} words on average; on-policy run {wall / 60:.1f} min "
        f"on 2 CPU cores (stack start not included). Plot `docs/demo-instructions.png`."
    )
    return {
        "eval_before": before,
        "eval_after": after,
        "eval_after_sd": after_sd,
        "eval_se": eval_se,
        "gain_se": gain_se,
        "mean_gain_se": mean_gain_se,
        "onpolicy_gain": on_gain,
        "onpolicy_gain_sd": on_sd,
        "offpolicy_gain": off_gain,
        "offpolicy_gain_sd": off_sd,
        "prompt_pass_before": pass_before,
        "prompt_pass_after": pass_after,
        "answered_before": answered_before,
        "answered_after": answered_after,
        "words_before": words_before,
        "words_after": words_after,
        "wall_s": wall,
        "seeds": n,
        "settings": {
            k: getattr(settings, k)
            for k in (
                "task",
                "rounds",
                "prompts_per_round",
                "num_samples",
                "max_tokens",
                "eval_size",
                "eval_samples",
                "temperature",
                "eval_temperature",
            )
        }
        | {"trainer": settings.trainer, "judge": settings.judge},
        "runs": runs,
        "examples": runs[0].get("examples", []),
        "summary": summary,
    }
