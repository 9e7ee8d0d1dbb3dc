"""The Grafana dashboard: generated from build_dashboard.py, and every metric its PromQL
names is in deploy/grafana/metrics.txt (which the end-to-end test checks against the running
services' /metrics)."""

from __future__ import annotations

import importlib.util
import json

import pytest
from _deploy import REPO, dc


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads(dc.DASHBOARD.read_text())


def test_committed_dashboard_is_the_generated_one() -> None:
    path = REPO / "deploy" / "grafana" / "build_dashboard.py"
    spec = importlib.util.spec_from_file_location("build_dashboard", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert dc.DASHBOARD.read_text() == module.render(), "run deploy/grafana/build_dashboard.py"


def test_every_queried_metric_is_listed(dashboard: dict) -> None:
    listed = dc.listed_metrics()
    assert len(listed) == len(set(listed))
    used = set().union(*(dc.promql_metrics(q) for q in dc.dashboard_queries(dashboard)))
    assert used - set(listed) == set()
    # And the list holds nothing the dashboard does not use.
    assert set(listed) - used == set()


def test_metric_name_extraction() -> None:
    expr = (
        'histogram_quantile(0.95, sum by (le, topic) (rate(onpolicy_judge_score_bucket{a="b{c}"}'
        "[$__rate_interval]))) / on (job) group_left max(vllm:kv_cache_usage_perc offset 5m)"
    )
    assert dc.promql_metrics(expr) == {"onpolicy_judge_score", "vllm:kv_cache_usage_perc"}
    assert dc.promql_metrics("sum(rate(x_total[5m])) > bool 0") == {"x_total"}


def test_dashboard_covers_every_stage(dashboard: dict) -> None:
    titles = " | ".join(p["title"].lower() for p in dashboard["panels"])
    for needed in (
        "prompts/s", "completion tokens/s", "pairs/s", "consumer lag", "judge latency",
        "dropped", "loss", "margins", "accuracy", "policy version", "vllm kv cache",
        "vllm requests running",
    ):  # fmt: skip
        assert needed in titles, needed
    queries = " ".join(dc.dashboard_queries(dashboard))
    for service in ("sampler", "judge", "trainer"):
        assert f"onpolicy_{service}_consumer_lag" in queries


def test_panels_fit_the_grid_and_use_the_datasource_variable(dashboard: dict) -> None:
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        pos = panel["gridPos"]
        assert pos["x"] + pos["w"] <= 24
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}"
            assert panel["targets"]
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    assert {"datasource", "model"} <= variables
