"""Writes deploy/grafana/dashboards/onpolicy.json, the one dashboard of the pipeline.

The JSON is generated so that panels stay uniform and every query is easy to review here;
`python deploy/grafana/build_dashboard.py` rewrites it, and a unit test checks that the
committed JSON matches this script and that every metric a query names is listed in
deploy/grafana/metrics.txt. The same JSON is provisioned by docker-compose and shipped to
Kubernetes as a ConfigMap for kube-prometheus-stack's Grafana sidecar.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

OUT = Path(__file__).parent / "dashboards" / "onpolicy.json"
DS = {"type": "prometheus", "uid": "${datasource}"}
RATE = "$__rate_interval"
SERVICES = ("sampler", "judge", "trainer")
# The topic each service's consumer group reads (groups are named after the services).
GROUP_TOPIC = {"sampler": "prompts", "judge": "completions", "trainer": "pairs"}
VLLM = 'model_name=~"$model"'


def target(expr: str, legend: str, ref: str) -> dict[str, Any]:
    return {"datasource": DS, "expr": expr, "legendFormat": legend, "refId": ref, "range": True}


def quantiles(metric: str, by: str = "") -> list[tuple[str, str]]:
    """p50/p95/p99 of a histogram, optionally per label ``by``."""
    group = f"le, {by}" if by else "le"
    suffix = f" {{{{{by}}}}}" if by else ""
    return [
        (
            f"histogram_quantile({q}, sum by ({group}) (rate({metric}_bucket[{RATE}])))",
            f"p{int(q * 100)}{suffix}",
        )
        for q in (0.5, 0.95, 0.99)
    ]


class Dashboard:
    def __init__(self) -> None:
        self.panels: list[dict[str, Any]] = []
        self.y = 0
        self.x = 0
        self.row_height = 0

    def row(self, title: str) -> None:
        self._newline()
        self.panels.append(
            {
                "type": "row",
                "title": title,
                "collapsed": False,
                "id": len(self.panels) + 1,
                "gridPos": {"h": 1, "w": 24, "x": 0, "y": self.y},
                "panels": [],
            }
        )
        self.y += 1

    def _newline(self) -> None:
        if self.x:
            self.y += self.row_height
            self.x = 0
            self.row_height = 0

    def panel(
        self,
        title: str,
        queries: list[tuple[str, str]],
        unit: str = "short",
        description: str = "",
        width: int = 8,
        kind: str = "timeseries",
        height: int = 8,
        stack: bool = False,
        extra: dict[str, Any] | None = None,
    ) -> None:
        if self.x + width > 24:
            self._newline()
        refs = "ABCDEFGHIJKLMNOP"
        custom: dict[str, Any] = {}
        if kind == "timeseries":
            custom = {"lineWidth": 1, "fillOpacity": 10, "showPoints": "never", "spanNulls": True}
            if stack:
                custom["stacking"] = {"mode": "normal", "group": "A"}
        panel: dict[str, Any] = {
            "type": kind,
            "title": title,
            "description": description,
            "id": len(self.panels) + 1,
            "datasource": DS,
            "gridPos": {"h": height, "w": width, "x": self.x, "y": self.y},
            "fieldConfig": {"defaults": {"unit": unit, "custom": custom}, "overrides": []},
            "options": {
                "legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
                "tooltip": {"mode": "multi", "sort": "desc"},
            },
            "targets": [target(e, legend, refs[i]) for i, (e, legend) in enumerate(queries)],
        }
        if extra:
            panel.update(extra)
        self.panels.append(panel)
        self.x += width
        self.row_height = max(self.row_height, height)


def evaluation_row(d: Dashboard) -> None:
    """Is it getting better? The held-out evaluation of every version (trainer's evaluator)."""
    d.row("Is it getting better?")
    per_version = [
        ("max by (version) (onpolicy_trainer_eval_reward)", "score"),
        ("max by (version) (onpolicy_trainer_eval_reward_se)", "± se"),
        ("max by (version) (onpolicy_trainer_eval_finished_rate)", "finished"),
        ("max by (version) (onpolicy_trainer_eval_completion_tokens)", "tokens"),
        ("max by (version) (onpolicy_trainer_eval_prompts)", "prompts"),
        ("max by (version) (onpolicy_trainer_eval_rejected)", "rejected"),
    ]
    d.panel(
        "Held-out evaluation per version",
        per_version,
        kind="table",
        width=12,
        description="Each policy version sampled on the held-out prompts (the heldout topic, "
        "never trained on) and scored by the deployment's judge: mean score ± its standard "
        "error (over prompts), answers that ended, mean length, prompts scored, and whether "
        "the regression guard rejected the version (1: rolled back).",
        extra={
            "targets": [
                {**target(e, legend, "ABCDEF"[i]), "instant": True, "range": False}
                | {"format": "table"}
                for i, (e, legend) in enumerate(per_version)
            ],
            "transformations": [
                {"id": "merge", "options": {}},
                {
                    "id": "organize",
                    "options": {
                        "excludeByName": {"Time": True},
                        "renameByName": {
                            "Value #A": "score",
                            "Value #B": "± se",
                            "Value #C": "finished",
                            "Value #D": "tokens",
                            "Value #E": "prompts",
                            "Value #F": "rejected",
                        },
                    },
                },
                {"id": "sortBy", "options": {"sort": [{"field": "version", "desc": True}]}},
            ],
        },
    )
    d.panel(
        "Held-out score per version (± 2 standard errors)",
        [
            ("max by (version) (onpolicy_trainer_eval_reward)", "v{{version}}"),
            (
                "max by (version) (onpolicy_trainer_eval_reward - 2 * "
                "onpolicy_trainer_eval_reward_se)",
                "v{{version}} - 2se",
            ),
            (
                "max by (version) (onpolicy_trainer_eval_reward + 2 * "
                "onpolicy_trainer_eval_reward_se)",
                "v{{version}} + 2se",
            ),
        ],
        width=12,
        description="One line per version from the moment it is evaluated; the guard rejects "
        "a version whose score is below the best earlier one by more than its margin.",
    )
    d.panel(
        "Versions rolled back",
        [
            ("sum(onpolicy_trainer_policy_rollbacks_total)", "rollbacks"),
            ("max(onpolicy_trainer_eval_best_version)", "best version"),
        ],
        kind="stat",
        description="Versions the trainer published with an earlier version's weights "
        "because the held-out evaluation rejected the policy before (also annotated).",
    )
    d.panel(
        "Share of judged pairs trained",
        [
            (
                "sum(onpolicy_trainer_pairs_trained_total) / "
                "clamp_min(sum(onpolicy_judge_pairs_produced_total), 1)",
                "trained / judged",
            ),
            (
                f"sum by (reason) (increase(onpolicy_trainer_pairs_dropped_total[{RATE}]))",
                "dropped {{reason}}",
            ),
        ],
        unit="short",
        description="How much of the sampled and judged work ended in a round (the round "
        "protocol keeps it near 1), and the pairs the trainer dropped, by reason.",
    )
    d.panel(
        "Pairs' version lag",
        quantiles("onpolicy_trainer_pair_version_lag"),
        description="Trainer's current version minus the version that sampled each pair it "
        "took: 0 is on-policy (strict), 1 one-step-off (max_staleness 1).",
    )


def build() -> dict[str, Any]:
    d = Dashboard()
    evaluation_row(d)

    d.row("Throughput per stage")
    d.panel(
        "Prompts/s",
        [
            (f"sum(rate(onpolicy_sampler_records_consumed_total[{RATE}]))", "sampler consumed"),
            (f"sum(rate(onpolicy_sampler_groups_produced_total[{RATE}]))", "groups produced"),
        ],
        unit="reqps",
        description="Prompts the sampler takes from the prompts topic, and the completion "
        "groups it publishes.",
    )
    d.panel(
        "Completion tokens/s",
        [
            (f"sum(rate(onpolicy_sampler_completion_tokens_total[{RATE}]))", "sampler"),
            (f"sum(rate(vllm:generation_tokens_total{{{VLLM}}}[{RATE}]))", "vLLM generated"),
        ],
        description="Tokens the sampler received, beside vLLM's own count.",
    )
    d.panel(
        "Pairs/s",
        [
            (f"sum(rate(onpolicy_judge_pairs_produced_total[{RATE}]))", "judge produced"),
            (f"sum(rate(onpolicy_trainer_records_consumed_total[{RATE}]))", "trainer consumed"),
            ("max(onpolicy_trainer_pairs_per_second)", "trainer training speed"),
        ],
        description="Preference pairs made by the judge and taken by the trainer; the "
        "trainer's own pairs/s while it trains a round.",
    )
    d.panel(
        "Records produced per topic",
        [
            (
                f"sum by (topic) (rate(onpolicy_{svc}_records_produced_total[{RATE}]))",
                f"{svc} → {{{{topic}}}}",
            )
            for svc in SERVICES
        ],
        unit="reqps",
        width=12,
    )
    d.panel(
        "Groups scored/s",
        [
            (f"sum(rate(onpolicy_judge_records_consumed_total[{RATE}]))", "judge consumed"),
            (f"sum(rate(onpolicy_judge_groups_scored_total[{RATE}]))", "judge scored"),
        ],
        unit="reqps",
        width=12,
    )

    d.row("Kafka: consumer lag and record handling")
    d.panel(
        "Consumer lag per topic and group",
        [
            (f"sum by (topic) (onpolicy_{svc}_consumer_lag)", f"group {svc} · {{{{topic}}}}")
            for svc in SERVICES
        ],
        description="Records behind the end of each topic, per consumer group (groups are "
        f"named after the services: {', '.join(f'{s} reads {t}' for s, t in GROUP_TOPIC.items())})."
        " KEDA scales the sampler and the judge on the same lag.",
        width=12,
    )
    d.panel(
        "Records in flight",
        [(f"sum(onpolicy_{svc}_in_flight)", svc) for svc in SERVICES],
        width=12,
    )
    d.panel(
        "Handle time p95 (consume → outputs acknowledged)",
        [
            (
                f"histogram_quantile(0.95, sum by (le) (rate(onpolicy_{svc}_handle_seconds_bucket"
                f"[{RATE}])))",
                svc,
            )
            for svc in SERVICES
        ],
        unit="s",
    )
    d.panel(
        "Dead letters/s",
        [
            (
                f"sum by (topic, kind) (rate(onpolicy_{svc}_dead_letters_total[{RATE}]))",
                f"{svc} {{{{topic}}}} {{{{kind}}}}",
            )
            for svc in SERVICES
        ],
        description="Records sent to the dead-letter topic, by reason kind.",
    )
    d.panel(
        "Retries and duplicates/s",
        [
            (
                f"sum by (kind) (rate(onpolicy_{svc}_retries_total[{RATE}]))",
                f"{svc} retry {{{{kind}}}}",
            )
            for svc in SERVICES
        ]
        + [
            (f"sum(rate(onpolicy_{svc}_duplicates_dropped_total[{RATE}]))", f"{svc} duplicate")
            for svc in SERVICES
        ],
    )
    d.panel(
        "Backend paused and circuit breaker",
        [
            (f"max by (reason) (onpolicy_{svc}_paused)", f"{svc} paused {{{{reason}}}}")
            for svc in SERVICES
        ]
        + [(f"max(onpolicy_{svc}_circuit_state)", f"{svc} circuit") for svc in SERVICES],
        description="paused 1: consumption stopped because the backend refuses requests as "
        "configured (reason config: a rejected API key, an unknown model) or failed every "
        "request lately (circuit_open); nothing is dead-lettered meanwhile. circuit: 0 closed, "
        "1 half-open (one record probes), 2 open.",
    )

    d.row("Sampler and vLLM")
    d.panel(
        "vLLM request latency (sampler side)",
        quantiles("onpolicy_sampler_request_seconds"),
        unit="s",
    )
    d.panel(
        "vLLM requests running",
        [(f"sum by (model_name) (vllm:num_requests_running{{{VLLM}}})", "{{model_name}}")],
    )
    d.panel(
        "vLLM KV cache usage",
        [(f"max by (model_name) (vllm:kv_cache_usage_perc{{{VLLM}}})", "{{model_name}}")],
        unit="percentunit",
    )
    d.panel(
        "vLLM prefix cache hits/s",
        [(f"sum(rate(vllm:prefix_cache_hits_total{{{VLLM}}}[{RATE}]))", "hits")],
        description="Prefix-cache hits (tokens): all N samples of a prompt share its prefix. "
        "vLLM caches whole KV blocks only (128 tokens on the CPU backend): prompts shorter "
        "than a block never hit.",
    )
    d.panel(
        "vLLM generation tokens/s per model",
        [
            (
                f"sum by (model_name) (rate(vllm:generation_tokens_total{{{VLLM}}}[{RATE}]))",
                "{{model_name}}",
            )
        ],
        description="The base model and each loaded policy adapter (policy-vN).",
        width=16,
    )

    d.row("Judge")
    d.panel(
        "Judge latency per group",
        quantiles("onpolicy_judge_latency_seconds"),
        unit="s",
    )
    d.panel(
        "Pairs dropped/s by reason",
        [(f"sum by (reason) (rate(onpolicy_judge_pairs_dropped_total[{RATE}]))", "{{reason}}")],
        stack=True,
        description="Candidate pairs the pairing rules rejected (ties, small margins, ...).",
    )
    d.panel(
        "Score distribution",
        [(f"sum by (le) (increase(onpolicy_judge_score_bucket[{RATE}]))", "{{le}}")],
        kind="heatmap",
        extra={
            "options": {
                "calculate": False,
                "yAxis": {"unit": "short"},
                "cellGap": 1,
                "color": {"mode": "scheme", "scheme": "Oranges", "steps": 64},
            },
            "targets": [
                {
                    **target(
                        f"sum by (le) (increase(onpolicy_judge_score_bucket[{RATE}]))",
                        "{{le}}",
                        "A",
                    ),
                    "format": "heatmap",
                }
            ],
        },
    )

    d.row("Trainer and policy")
    d.panel(
        "DPO loss per round",
        [("max(onpolicy_trainer_loss)", "loss")],
        description="The last round's mean DPO loss.",
    )
    d.panel(
        "Reward margins per round",
        [("max(onpolicy_trainer_rewards_margins)", "chosen - rejected")],
        description="Mean implicit-reward margin of chosen over rejected: it grows as the "
        "policy learns the judge's preference.",
    )
    d.panel(
        "Reward accuracy per round",
        [("max(onpolicy_trainer_rewards_accuracies)", "accuracy")],
        unit="percentunit",
        description="Share of pairs whose chosen answer has the higher implicit reward.",
    )
    d.panel(
        "Policy version over time",
        [
            ("max(onpolicy_trainer_policy_version)", "trainer published"),
            ("max(onpolicy_sampler_policy_version)", "sampler serving (newest)"),
            ("min(onpolicy_sampler_policy_version)", "sampler serving (oldest)"),
        ],
        description="The trainer publishes a version per round; samplers hot-load it. A gap "
        "that stays open means a sampler failed to load an adapter.",
        width=12,
    )
    d.panel(
        "Round duration",
        [
            # round_seconds is a histogram: its series are _bucket, _sum and _count.
            (
                "sum(onpolicy_trainer_round_seconds_sum) / "
                "sum(onpolicy_trainer_round_seconds_count)",
                "mean of the rounds so far",
            ),
            (
                f"sum(increase(onpolicy_trainer_round_seconds_sum[{RATE}])) / "
                f"sum(increase(onpolicy_trainer_round_seconds_count[{RATE}]))",
                "rounds ended in the interval",
            ),
        ],
        unit="s",
        width=12,
        description="Train + save of a round (the trainer's round_seconds histogram).",
    )
    d.panel(
        "Sampler policy load failures",
        [
            (
                "sum by (reason) (increase(onpolicy_sampler_policy_load_failures_total"
                "[$__rate_interval]))",
                "{{reason}}",
            ),
            ("sum(onpolicy_sampler_policy_load_failed)", "replicas not serving the newest"),
        ],
        description="Failed attempts to make a policy ready, by reason (rank above "
        "max_lora_rank, base model, full checkpoint, vLLM refusal: permanent; fetch, vLLM "
        "unavailable: retried). A failing replica is not ready until a later version loads.",
        width=12,
    )

    return {
        "title": "onpolicy",
        "uid": "onpolicy-pipeline",
        "description": "On-policy DPO pipeline: sampler (vLLM) → judge → trainer → policy.",
        "tags": ["onpolicy", "kafka", "vllm", "dpo"],
        "editable": True,
        "graphTooltip": 1,
        "refresh": "10s",
        "schemaVersion": 39,
        "version": 1,
        "time": {"from": "now-1h", "to": "now"},
        "timezone": "browser",
        "annotations": {
            "list": [
                {
                    "name": "Policy rolled back",
                    "datasource": DS,
                    "enable": True,
                    "iconColor": "red",
                    "expr": "changes(onpolicy_trainer_policy_rollbacks_total[1m]) > 0",
                    "step": "30s",
                    "titleFormat": "policy rolled back (regression guard)",
                }
            ]
        },
        "links": [],
        "templating": {
            "list": [
                {
                    "name": "datasource",
                    "label": "Data source",
                    "type": "datasource",
                    "query": "prometheus",
                    "current": {},
                    "hide": 0,
                    "refresh": 1,
                    "regex": "",
                },
                {
                    "name": "model",
                    "label": "vLLM model",
                    "type": "query",
                    "datasource": DS,
                    "definition": "label_values(vllm:num_requests_running, model_name)",
                    "query": {
                        "query": "label_values(vllm:num_requests_running, model_name)",
                        "refId": "model",
                    },
                    "includeAll": True,
                    "allValue": ".*",
                    "multi": True,
                    "current": {},
                    "refresh": 2,
                    "sort": 1,
                    "hide": 0,
                },
            ]
        },
        "panels": d.panels,
    }


def render() -> str:
    return json.dumps(build(), indent=2, ensure_ascii=False) + "\n"


if __name__ == "__main__":
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(render())
    print(f"wrote {OUT}")
