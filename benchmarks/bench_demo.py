"""The seed's claim, measured: held-out reward before round 1 and after the last round of the
demo loop, with the off-policy comparison (as many pairs, all sampled by the initial policy).

This is `make demo`'s configuration run through ``Runner``; it starts and stops its own
stack. Results: ``benchmarks/results/demo.json`` and the run folder it names.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from onpolicy.run.runner import Runner
from onpolicy.run.settings import RunSettings
from onpolicy.settings import load_settings
from onpolicy.stack import StackSettings


def run(args: Any) -> dict[str, Any]:
    overrides: dict[str, Any] = {
        "compare_offpolicy": True,
        "runs_dir": Path(tempfile.mkdtemp(prefix="bench-demo-")),
    }
    if args.quick:
        overrides |= {"rounds": 1, "prompts_per_round": 16, "eval_size": 16}
    settings = load_settings(RunSettings, **overrides)
    stack = load_settings(StackSettings)
    runner = Runner(settings, stack, status=lambda *a, **k: None)
    report = runner.run()
    on = report["lineages"]["onpolicy"]
    off = report["lineages"].get("offpolicy", [])

    def gain(rounds: list[dict[str, Any]]) -> float | None:
        done = [r["eval_reward_mean"] for r in rounds if r["eval_reward_mean"] is not None]
        return done[-1] - done[0] if len(done) >= 2 else None

    def curve(rounds: list[dict[str, Any]]) -> str:
        return " → ".join(
            f"{r['eval_reward_mean']:.3f}" for r in rounds if r["eval_reward_mean"] is not None
        )

    on_gain, off_gain = gain(on), gain(off)
    summary = (
        f"**Demo loop** (`python -m benchmarks demo`, {settings.rounds} rounds x "
        f"{settings.prompts_per_round} prompts, N={settings.num_samples}, "
        f"{settings.eval_size} held-out prompts, `concise` judge): held-out reward "
        f"on-policy {curve(on)} ({on_gain:+.3f})"
    )
    if off:
        summary += (
            f"; off-policy (same number of pairs, all from v0) {curve(off)} ({off_gain:+.3f})"
        )
    summary += f"; on-policy part took {sum(_secs(r) for r in on) / 60:.1f} min."
    return {
        "onpolicy_gain": on_gain,
        "offpolicy_gain": off_gain,
        "onpolicy": on,
        "offpolicy": off,
        "run_dir": str(runner.run_dir),
        "wall_s": report["wall_s"],
        "summary": summary,
    }


def _secs(r: dict[str, Any]) -> float:
    return r["sampling_s"] + r["judging_s"] + r["training_s"] + r["loading_s"]
