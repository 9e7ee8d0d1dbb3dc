"""The whole loop with every component real: broker, vLLM, sampler, judge, trainer."""

from __future__ import annotations

import contextlib
import json
import re
import shutil
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pyarrow.parquet as pq
import pytest
from _prometheus import Prometheus, finite_values, no_prometheus, panel_queries

from onpolicy import messages as m
from onpolicy.bus import read_topic
from onpolicy.run.runner import Runner
from onpolicy.run.settings import RunSettings
from onpolicy.settings import load_settings
from onpolicy_sampler.adapters import adapter_name, content_digest

ROOT = Path(__file__).resolve().parents[2]
# A whole run per module fixture: generous for a loaded machine (about 4 min alone on 2 cores).
pytestmark = [pytest.mark.e2e, pytest.mark.vllm, pytest.mark.timeout(1800)]


def run_loop(kafka, vllm, model_dir, stack_settings, runs_dir, **overrides):
    """Two small rounds of the real loop on the test stack; returns (runner, report)."""
    vllm.start()  # no-op when it runs; an earlier test may have stopped it
    values = dict(
        kafka=kafka,
        external_stack=True,
        vllm_url=vllm.url,
        model=model_dir,
        rounds=2,
        # Pairs per round: at 48 tokens most answers are cut off, and a group none of whose
        # answers ended makes no pair, so the trainer plans several prompts per pair.
        prompts_per_round=3,
        eval_samples=2,
        num_samples=3,
        max_tokens=48,
        max_prompt_tokens=96,  # the demo's prompts have at most 60 tokens
        runs_dir=runs_dir,
    )
    settings = load_settings(RunSettings, **(values | overrides))
    stack = stack_settings.model_copy(update={"served_model_name": "SmolLM2-135M-Instruct"})
    runner = Runner(settings, stack, status=lambda *a, **k: None)
    return runner, runner.run()


@pytest.fixture(scope="module")
def prometheus(vllm, tmp_path_factory):
    """A real Prometheus that scrapes the services of the module's `run` while it runs
    (None without the binary: the run's other tests go on, the dashboard test says why)."""
    binary = shutil.which("prometheus")
    if binary is None:
        yield None
        return
    server = Prometheus(binary, tmp_path_factory.mktemp("prometheus"), vllm.url)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def run(kafka, vllm, model_dir, stack_settings, tmp_path_factory, prometheus):
    with prometheus.watch() if prometheus else contextlib.nullcontext():
        return run_loop(
            kafka,
            vllm,
            model_dir,
            stack_settings,
            tmp_path_factory.mktemp("runs"),
            eval_size=4,
            run_id="e2e",
            compare_offpolicy=True,
            trainer={"max_length": 144, "per_device_batch_size": 2},
        )


def test_policy_versions_go_0_1_2_and_round_two_is_sampled_by_v1(run, kafka):
    runner, report = run
    assert not report["interrupted"]
    assert [r["policy_version"] for r in report["rounds"]] == [0, 1, 2]
    prefix = f"onpolicy.{runner.run_id}."
    updates = [r.message for r in read_topic(kafka, prefix + "policy", m.PolicyUpdate)]
    assert [u.version for u in updates] == [1, 2]
    for u in updates:
        assert Path(u.adapter_uri, "adapter_config.json").exists()
    groups = [r.message for r in read_topic(kafka, prefix + "completions", m.CompletionGroup)]
    train = [g for g in groups if g.prompt.dataset_split == "train"]
    # The round protocol, strict: round N trains only pairs sampled by v(N-1).
    checkpoints = runner.run_dir / "onpolicy" / "checkpoints"
    for u in updates:
        trained = pq.read_table(checkpoints / "datasets" / f"round-{u.version}.parquet")
        assert set(trained.column("policy_version").to_pylist()) == {u.version - 1}
    # The sampler's name for v1: the version and a digest of the adapter's files.
    v1 = adapter_name(1, content_digest(Path(updates[0].adapter_uri)))
    assert {g.model for g in train if g.policy_version == 1} == {v1}
    # The run was a client of the protocol: the trainer planned its rounds.
    plans = [r.message for r in read_topic(kafka, prefix + "rounds", m.RoundPlan)]
    assert {p.round for p in plans} >= {1, 2}
    # The held-out prompts (their own topic) were sampled once by every version.
    evals = [g for g in groups if g.prompt.dataset_split == "eval"]
    assert {g.source.topic for g in evals} == {prefix + "heldout"}
    per_version = {
        v: sorted(g.prompt_id for g in evals if g.policy_version == v) for v in (0, 1, 2)
    }
    assert set(g.policy_version for g in evals) == {0, 1, 2}
    assert per_version[0] == per_version[1] == per_version[2] and len(per_version[0]) == 4


def test_one_evaluation_per_version_with_the_numbers_of_the_report(run, kafka):
    """The services' EvalResult records are what the local report shows."""
    runner, report = run
    prefix = f"onpolicy.{runner.run_id}."
    results = [r.message for r in read_topic(kafka, prefix + "evals", m.EvalResult)]
    assert [e.version for e in results] == [0, 1, 2]
    for e, row in zip(results, report["rounds"], strict=True):
        assert e.complete and e.prompts == e.expected == 4 and e.samples == 8
        assert e.verdict in ("promoted", "rejected")
        assert row["eval_reward_mean"] == pytest.approx(e.mean)
        assert row["eval_reward_se"] == pytest.approx(e.se)
        assert row["eval_finished_rate"] == pytest.approx(e.finished_rate)
        assert row["eval_verdict"] == e.verdict
    # The judge scored those very groups: the mean is theirs, recomputed here.
    scored = [r.message for r in read_topic(kafka, prefix + "scored", m.ScoredGroup)]
    for e in results:
        mine = [
            s
            for x in scored
            if x.group.source.topic == prefix + "heldout" and x.group.policy_version == e.version
            for s in x.scores
        ]
        assert len(mine) == e.samples and sum(mine) / len(mine) == pytest.approx(e.mean)


def test_report_and_dataset_are_complete(run):
    runner, report = run
    on_disk = json.loads((runner.run_dir / "report.json").read_text())
    assert on_disk["rounds"] == report["rounds"]
    for r in report["rounds"]:
        for key in (
            "round",
            "policy_version",
            "pairs",
            "eval_reward_mean",
            "eval_reward_se",
            "sampling_s",
            "judging_s",
            "training_s",
            "loading_s",
        ):
            assert key in r
        assert r["eval_reward_mean"] is not None and 0.0 <= r["eval_reward_mean"] <= 1.0
    assert report["rounds"][0]["pairs"] > 0 and report["rounds"][1]["pairs"] > 0
    assert report["rounds"][0]["training_s"] > 0 and report["rounds"][0]["train_metrics"]
    assert (runner.run_dir / "report.png").stat().st_size > 10_000
    assert (runner.run_dir.parent / "latest").resolve() == runner.run_dir
    everything = pq.read_table(runner.run_dir / "pairs.parquet").to_pylist()
    # Every pair made was trained: the trainer planned no round past the run's last.
    rows = [r for r in everything if r["lineage"] == "onpolicy"]
    assert len(rows) == report["rounds"][0]["pairs"] + report["rounds"][1]["pairs"]
    assert len({r["pair_id"] for r in rows}) == len(rows)  # no pair twice
    for row in rows:
        assert row["chosen"] != row["rejected"]
        assert row["prompt"][-1]["role"] == "user" and row["chosen"][0]["role"] == "assistant"
        assert row["chosen_score"] >= row["rejected_score"]
    assert {r["policy_version"] for r in rows} == {0, 1}
    # The trainer kept every round's pairs, each exactly once.
    checkpoints = runner.run_dir / "onpolicy" / "checkpoints"
    trained = [
        r
        for f in sorted((checkpoints / "datasets").glob("*.parquet"))
        for r in pq.read_table(f).to_pylist()
    ]
    assert sorted(r["pair_id"] for r in trained) == sorted(r["pair_id"] for r in rows)
    assert sorted(p.name for p in checkpoints.glob("policy-v*")) == ["policy-v1", "policy-v2"]


def test_the_trainer_trains_exactly_the_token_ids_the_sampler_drew(run, kafka, model_dir):
    """Token-exact: every trained row is the sampled prompt ids + the sampled answer ids,
    EOS only where the sample ended on it, and no cut-off answer trained as chosen."""
    from transformers import AutoTokenizer

    eos = AutoTokenizer.from_pretrained(model_dir).eos_token_id
    runner, _ = run
    prefix = f"onpolicy.{runner.run_id}."
    groups = {
        r.message.id: r.message
        for r in read_topic(kafka, prefix + "completions", m.CompletionGroup)
    }
    pairs = {r.message.id: r.message for r in read_topic(kafka, prefix + "pairs", m.PreferencePair)}
    checkpoints = runner.run_dir / "onpolicy" / "checkpoints"
    trained = [
        r
        for f in sorted((checkpoints / "datasets").glob("*.parquet"))
        for r in pq.read_table(f).to_pylist()
    ]
    assert trained
    finish_reasons = set()
    for row in trained:
        pair = pairs[row["pair_id"]]
        group = groups[pair.group_id]
        by_index = {c.index: c for c in group.completions}
        chosen, rejected = by_index[pair.chosen_index], by_index[pair.rejected_index]
        assert row["prompt_ids"] == list(group.prompt_token_ids) and row["prompt_ids"]
        assert row["chosen_ids"] == list(chosen.token_ids)
        assert row["rejected_ids"] == list(rejected.token_ids)
        for ids_, completion in ((row["chosen_ids"], chosen), (row["rejected_ids"], rejected)):
            assert (ids_[-1] == eos) == (completion.finish_reason == "stop")
            finish_reasons.add(completion.finish_reason)
        assert chosen.finish_reason == "stop"  # a truncated answer is never chosen
    # At 48 tokens many answers are cut off: some of them were trained, as rejected, as drawn.
    assert finish_reasons == {"stop", "length"}


def test_offpolicy_lineage_trains_as_many_pairs_all_sampled_by_the_initial_policy(run, kafka):
    runner, report = run
    on, off = report["lineages"]["onpolicy"], report["lineages"]["offpolicy"]
    prefix = f"onpolicy.{runner.run_id}-off."
    # Round r trains as many pairs as the on-policy round r, while v0's pairs last: a round
    # left with none trains nothing and makes no version (v0's groups may tie, so how many
    # pairs v0 made varies from run to run).
    available = len(list(read_topic(kafka, prefix + "pairs", m.PreferencePair)))
    wanted = []
    for r in on[:2]:
        wanted.append(min(r["pairs"], available))
        available -= wanted[-1]
    versions = [0]
    for w in wanted:
        versions.append(versions[-1] + bool(w))
    assert [r["policy_version"] for r in off] == versions and versions[1] == 1
    # Every evaluation of both lineages is measured, after each round too (a bug once lost
    # the off-policy lineage's evaluations after rounds 1..R-1).
    assert all(r["eval_reward_mean"] is not None for r in on + off)
    groups = [r.message for r in read_topic(kafka, prefix + "completions", m.CompletionGroup)]
    assert {g.policy_version for g in groups if g.prompt.dataset_split == "train"} == {0}
    evals = [g for g in groups if g.prompt.dataset_split == "eval"]
    assert {g.policy_version for g in evals} == set(versions)
    updates = [r.message for r in read_topic(kafka, prefix + "policy", m.PolicyUpdate)]
    assert [u.num_pairs for u in updates] == [w for w in wanted if w]
    assert wanted == [r["pairs"] for r in off[:2]]
    exported = pq.read_table(runner.run_dir / "pairs.parquet").to_pylist()
    assert {r["policy_version"] for r in exported if r["lineage"] == "offpolicy"} == {0}


def test_every_metric_the_dashboard_queries_is_served(run, vllm_server):
    runner, _ = run
    exposed = ""
    for svc in ("sampler", "judge", "trainer"):
        exposed += (runner.run_dir / "onpolicy" / f"{svc}.metrics.txt").read_text()
    exposed += httpx.get(f"{vllm_server}/metrics").text
    names = set(
        re.findall(
            r"^([a-zA-Z_:][a-zA-Z0-9_:]*?)(?:_bucket|_count|_sum|_created)?[{ ]", exposed, re.M
        )
    )
    wanted = [
        line.strip()
        for line in (ROOT / "deploy/grafana/metrics.txt").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    missing = [w for w in wanted if w not in names]
    assert not missing, f"dashboard metrics not served: {missing}"


# Panels all of whose values are 0 in a healthy run, and why. They are checked like the
# others (every query returns a finite value, so the metric, its labels and the expression
# are right, exported at zero); only a non-zero value is not asked of them.
ZERO_IN_A_HEALTHY_RUN = {
    "Dead letters/s": "no record is malformed or fails for good",
    "Retries and duplicates/s": "vLLM and the judge answer every request; no record twice",
    "Backend paused and circuit breaker": "no backend refuses or fails: nothing pauses",
    "Sampler policy load failures": "every adapter the trainer publishes loads",
    # Rollbacks and the best promoted version: in two rounds of a noisy evaluation (4
    # prompts) no version may be rejected while v0 stays the best one.
    "Versions rolled back": "no version rejected, and v0 may stay the best",
    # Strict rounds train only what the current version sampled, by design; the off-policy
    # lineage's pairs are 1 behind only when v0's pairs outlast its first round.
    "Pairs' version lag": "strict rounds: every pair is sampled by the version trained (0)",
    # vLLM caches whole KV blocks only, 128 tokens on the CPU backend: these prompts (at most
    # 96 tokens) fill none, so 0 hits out of thousands of queries (measured).
    "vLLM prefix cache hits/s": "prompts shorter than a KV block never hit",
}


def test_every_dashboard_panel_has_data_in_prometheus(run, prometheus):
    """Debian's prometheus scraped the run's services (1 s) and vLLM: every query of every
    panel, as Grafana sends it, returns data over the run, and each panel but the few above
    shows a non-zero value."""
    if prometheus is None:
        no_prometheus()
    assert set(prometheus.stopped_at) == {"onpolicy", "offpolicy"}
    start, end = prometheus.started_at, max(prometheus.stopped_at.values())
    # Every service of both lineages and vLLM was scraped.
    up = prometheus.api("query", query=f"max_over_time(up[{int(end - start) + 60}s])", time=end)
    scraped = {r["metric"]["instance"] for r in up["data"]["result"] if r["value"][1] == "1"}
    wanted = {t for group in prometheus.targets for t in group["targets"]}
    assert len(wanted) == 6 and wanted | {urlsplit(prometheus.vllm_url).netloc} <= scraped
    dashboard = json.loads((ROOT / "deploy/grafana/dashboards/onpolicy.json").read_text())
    queries = panel_queries(dashboard)
    assert len(queries) > 50
    empty, values = [], {}
    for q in queries:
        # A table's instant query is evaluated when the on-policy lineage ended, as the
        # dashboard would show it then; the others over the whole run.
        at = prometheus.stopped_at["onpolicy"] if q.instant else end
        found = finite_values(prometheus.query(q, start, at))
        if not found:
            empty.append(f"{q.name}: {q.expr}")
        values.setdefault(q.panel, []).extend(found)
    assert not empty, "dashboard queries without data:\n" + "\n".join(empty)
    flat = [p for p, v in values.items() if not any(v) and p not in ZERO_IN_A_HEALTHY_RUN]
    assert not flat, f"panels whose every value is 0: {flat}"
    # The $model variable lists the served model (its query runs as Grafana's label_values).
    models = prometheus.api(
        "label/model_name/values", **{"match[]": "vllm:num_requests_running"}, start=start, end=end
    )["data"]
    assert "SmolLM2-135M-Instruct" in models
    # The annotation fires on a rollback only (the guard may or may not reject a version in
    # two rounds): its query must be valid, and the counter it watches served.
    for annotation in dashboard["annotations"]["list"]:
        prometheus.api("query", query=annotation["expr"], time=end)
    rollbacks = prometheus.api("query", query="onpolicy_trainer_policy_rollbacks_total", time=end)
    assert rollbacks["data"]["result"]


@pytest.fixture(scope="module")
def overlap_run(kafka, vllm, model_dir, stack_settings, tmp_path_factory):
    # As many prompts and samples as the strict run: fewer left a round with every group
    # tied (no pairs) now and then.
    return run_loop(
        kafka,
        vllm,
        model_dir,
        stack_settings,
        tmp_path_factory.mktemp("runs"),
        max_staleness=1,
        eval_size=2,
        # Room for most answers to end (SmolLM2 averages ~58 tokens), so a group's samples
        # differ in length and score: at 40 tokens all of a round's groups were once cut
        # alike, tied under the judge, and the round made no pairs.
        max_tokens=96,
        run_id="e2e-overlap",
        trainer={"max_length": 192, "per_device_batch_size": 2},
    )


def test_overlap_mode_samples_the_next_round_while_training_one_step_off(overlap_run, kafka):
    runner, report = overlap_run
    assert not report["interrupted"] and report["mode"] == "overlap"
    assert [r["policy_version"] for r in report["rounds"]] == [0, 1, 2]
    prefix = f"onpolicy.{runner.run_id}."
    groups = [r.message for r in read_topic(kafka, prefix + "completions", m.CompletionGroup)]
    # Round 2 was planned as soon as round 1 was sampled, while v1 trained: for v0 ...
    plans = [r.message for r in read_topic(kafka, prefix + "rounds", m.RoundPlan)]
    assert min((p for p in plans if p.round == 2), key=lambda p: p.seq).sample_version == 0
    # ... and the trainer (max_staleness 1) trained on what v0 sampled: one-step-off.
    updates = [r.message for r in read_topic(kafka, prefix + "policy", m.PolicyUpdate)]
    assert [u.version for u in updates] == [1, 2] and all(u.num_pairs > 0 for u in updates)
    assert report["rounds"][1]["pairs"] == updates[1].num_pairs
    checkpoints = runner.run_dir / "onpolicy" / "checkpoints"
    second = pq.read_table(checkpoints / "datasets" / "round-2.parquet")
    assert 0 in set(second.column("policy_version").to_pylist()) <= {0, 1}
    # Evaluation still measures each version itself.
    evals = [g for g in groups if g.prompt.dataset_split == "eval"]
    assert {g.policy_version for g in evals} == {0, 1, 2}
    # The report says how much sampling ran during training: v0 sampled round 2's prompts
    # while the trainer trained round 1.
    assert report["rounds"][0]["overlap_s"] > 0
    total = sum(r["overlap_s"] for r in report["rounds"])
    assert report["overlap_saved_s"] == round(total, 1)
