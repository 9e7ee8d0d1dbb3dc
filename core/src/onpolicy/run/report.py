"""The run folder's report: ``report.json``, ``report.png`` and ``pairs.parquet``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from onpolicy import messages as m

if TYPE_CHECKING:
    from onpolicy.run.lineage import Lineage
    from onpolicy.run.settings import RunSettings


def pair_rows(pairs: list[m.PreferencePair], lineage: str = "") -> list[dict[str, Any]]:
    """TRL's preference format (conversational where the prompt is chat) plus metadata."""
    rows = []
    for p in pairs:
        rows.append(
            {
                **m.trl_preference(p),
                "pair_id": p.id,
                "prompt_id": p.prompt_id,
                "policy_version": p.policy_version,
                "round": p.prompt.round,
                "chosen_score": p.chosen_score,
                "rejected_score": p.rejected_score,
                "margin": p.margin,
                "judge_id": p.judge_id,
                "lineage": lineage,
            }
        )
    return rows


def write_pairs(path: Path, rows: list[dict[str, Any]]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    # Chat and plain-text prompts do not mix in one column type; keep chat ones as they are.
    pq.write_table(pa.Table.from_pylist(rows), path)


def plot(path: Path, lineages: dict[str, list[dict[str, Any]]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, rounds in lineages.items():
        done = [r for r in rounds if r["eval_reward_mean"] is not None]
        xs = [r["policy_version"] for r in done]
        ys = [r["eval_reward_mean"] for r in done]
        sd = [r["eval_reward_se"] or 0.0 for r in done]
        ax.errorbar(xs, ys, yerr=sd, marker="o", capsize=4, label=name)
        ax2.plot(xs, [r["eval_completion_tokens_mean"] for r in done], marker="o", label=name)
    ax.set(
        title="Held-out evaluation reward",
        xlabel="policy version (DPO rounds)",
        ylabel="judge reward (mean ± std)",
    )
    ax2.set(
        title="Held-out completion length",
        xlabel="policy version (DPO rounds)",
        ylabel="tokens per completion",
    )
    for a in (ax, ax2):
        a.grid(alpha=0.3)
        a.legend()
        a.xaxis.get_major_locator().set_params(integer=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(
    run_dir: Path,
    run_id: str,
    settings: RunSettings,
    lineages: list[Lineage],
    wall_s: float,
    interrupted: bool,
    loop_s: float | None = None,
    error: str | None = None,
) -> dict[str, Any]:
    per_lineage = {lin.name: lin.as_dicts() for lin in lineages}
    rounds = per_lineage.get("onpolicy", [])
    report: dict[str, Any] = {
        "run_id": run_id,
        "interrupted": interrupted,
        "error": error,  # what ended a failed run early; None when it finished
        "mode": "strict" if settings.max_staleness == 0 else "overlap",
        "wall_s": round(wall_s, 1),
        "loop_s": None if loop_s is None else round(loop_s, 1),
        "rounds": rounds,
        "lineages": per_lineage,
        # Each crash of a service that was restarted: lineage, service, exit code, when.
        "restarts": [r for lin in lineages if hasattr(lin, "restarts") for r in lin.restarts()],
    }
    if settings.max_staleness > 0:
        # Sampling pulled forward into training time: what strict mode would have waited for.
        report["overlap_saved_s"] = round(sum(r["overlap_s"] for r in rounds), 1)
    evals = [r["eval_reward_mean"] for r in rounds if r["eval_reward_mean"] is not None]
    if len(evals) >= 2:
        report["eval_reward_gain"] = evals[-1] - evals[0]
    rows = []
    for lin in lineages:
        if hasattr(lin, "pairs"):
            rows += pair_rows(
                [p for p in lin.pairs.records if p.prompt.dataset_split != "eval"], lin.name
            )
    if rows:
        write_pairs(run_dir / "pairs.parquet", rows)
    report["pairs_total"] = sum(r["lineage"] == "onpolicy" for r in rows)
    (run_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    if any(r["eval_reward_mean"] is not None for lin in per_lineage.values() for r in lin):
        plot(run_dir / "report.png", per_lineage)
    return report
