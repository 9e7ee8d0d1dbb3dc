"""Strict vs overlap mode: the wall time of the same rounds, one run of each.

Strict (``max_staleness=0``) publishes a round's prompts only once the sampler serves the
policy the round trains; overlap (``max_staleness=1``) samples the next round with the
current policy while the trainer trains (one-step-off). Both runs use the same prompts,
settings and judge, each on its own fresh local stack; the clock is the on-policy loop alone
(``loop_s``, without starting the stack). ``saved_s`` is the overlap run's own account: the
sampling that ran while the trainer trained. On two CPU cores the sampler and the trainer
share the cores, so the measured saving is below that account.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from onpolicy.run.runner import Runner
from onpolicy.run.settings import RunSettings
from onpolicy.settings import load_settings
from onpolicy.stack import StackSettings


def _run(max_staleness: int, quick: bool) -> dict[str, Any]:
    overrides: dict[str, Any] = {
        "max_staleness": max_staleness,
        "rounds": 2 if quick else 3,
        "prompts_per_round": 8 if quick else 16,
        "eval_size": 8,
        "runs_dir": Path(tempfile.mkdtemp(prefix="bench-overlap-")),
    }
    settings = load_settings(RunSettings, **overrides)
    runner = Runner(settings, load_settings(StackSettings), status=lambda *a, **k: None)
    report = runner.run()
    if report["interrupted"] or report["loop_s"] is None:
        raise RuntimeError(f"the {report['mode']} run did not finish: {runner.run_dir}")
    report["run_dir"] = str(runner.run_dir)
    report["settings"] = overrides | {"runs_dir": str(overrides["runs_dir"])}
    return report


def run(args: Any) -> dict[str, Any]:
    quick = bool(getattr(args, "quick", False))
    strict = _run(0, quick)
    overlap = _run(1, quick)

    def curve(report: dict[str, Any]) -> list[float | None]:
        return [r["eval_reward_mean"] for r in report["rounds"]]

    def stages(report: dict[str, Any]) -> dict[str, float]:
        keys = ("sampling_s", "judging_s", "training_s", "loading_s", "overlap_s")
        return {k: round(sum(r[k] for r in report["rounds"]), 1) for k in keys}

    ratio = overlap["loop_s"] / strict["loop_s"]
    s = strict["settings"]
    summary = (
        f"**Overlap mode** (`python -m benchmarks overlap`, {s['rounds']} rounds x "
        f"{s['prompts_per_round']} prompts, {s['eval_size']} held-out): the loop took "
        f"{overlap['loop_s']:.0f} s with `--max-staleness 1` vs {strict['loop_s']:.0f} s strict "
        f"({ratio:.2f}x); by its own account {overlap['overlap_saved_s']:.0f} s of sampling ran "
        "while the trainer trained. 2 CPU cores shared by vLLM and TRL."
    )
    return {
        "strict_loop_s": strict["loop_s"],
        "overlap_loop_s": overlap["loop_s"],
        "ratio": round(ratio, 3),
        "overlap_saved_s": overlap["overlap_saved_s"],
        "strict_stages": stages(strict),
        "overlap_stages": stages(overlap),
        "strict_eval_reward": curve(strict),
        "overlap_eval_reward": curve(overlap),
        "strict_run_dir": strict["run_dir"],
        "overlap_run_dir": overlap["run_dir"],
        "settings": s | {"max_staleness": "0 vs 1"},
        "summary": summary,
    }
