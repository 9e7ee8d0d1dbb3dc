"""The regression guard in a real run: a policy made worse on purpose is rolled back.

Training pairs prefer answers cut off at the token limit (``reversed_judge``) and are trained
hard, so v1 stops ending its answers and scores worse on the held-out prompts than v0 by the
judge the evaluation uses (``concise``). The trainer's evaluator rejects v1, and the trainer
publishes v2 with v0's weights (a LoRA whose B matrices are zero) as soon as the verdict is
out: v1's answers mostly tie (all cut off), so it may make no pairs at all, and the guard does
not wait for a round of them. Whatever v1 sampled is dropped as rolled_back, and the sampler
ends up serving v2.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from safetensors.torch import load_file

from onpolicy import messages as m
from onpolicy.bus import read_topic
from onpolicy.run.runner import Runner
from onpolicy.run.settings import RunSettings
from onpolicy.settings import load_settings

# A whole run per module fixture: generous for a loaded machine (about 4 min alone on 2 cores).
pytestmark = [pytest.mark.e2e, pytest.mark.vllm, pytest.mark.timeout(1800)]
HERE = Path(__file__).resolve().parent


def trained_ids(runner: Runner) -> set[str]:
    """Pair ids of every saved round's dataset (what was trained)."""
    import pyarrow.parquet as pq

    datasets = runner.run_dir / "checkpoints" / "datasets"
    return {i for f in datasets.glob("*.parquet") for i in pq.read_table(f)["pair_id"].to_pylist()}


def sample(text: str, name: str, **labels: str) -> float:
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    raise KeyError(name)


def test_a_policy_made_worse_on_purpose_is_rolled_back_to_the_better_version(
    kafka, vllm, model_dir, stack_settings, tmp_path, monkeypatch
):
    # The judge service imports the scorer from here.
    monkeypatch.setenv(
        "PYTHONPATH", os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")]))
    )
    vllm.start()
    settings = load_settings(
        RunSettings,
        kafka=kafka,
        external_stack=True,
        vllm_url=vllm.url,
        model=model_dir,
        rounds=2,
        prompts_per_round=8,
        num_samples=4,
        max_tokens=48,
        max_prompt_tokens=96,
        # Enough held-out samples that v0's mean is well above v1's (whose answers all run
        # into the limit and score half at most): with 8 x 2, v0's standard error was 0.08.
        eval_size=12,
        eval_samples=3,
        runs_dir=tmp_path,
        run_id="guard",
        # Pairs from every group that does not tie, ended or not: the reversed scores prefer
        # answers that run on, which the default rule (the chosen answer must have ended)
        # would mostly refuse to pair.
        judge={"functions": [{"name": "reversed_judge:score"}], "pairs": {"finished": "off"}},
        trainer={
            "max_length": 144,
            "per_device_batch_size": 4,
            # Hard enough that one round of reversed pairs moves the answers a long way.
            "learning_rate": 3e-3,
            "num_epochs": 3,
            # The drop here is large (measured: held-out 0.58-0.68 for v0, 0.50 +- 0.004 for
            # v1, whose answers all run into the limit), but v0's own noise is not small: any
            # drop rejects, so that the verdict does not hang on how v0's few samples fell.
            # (A v1 promoted here makes no pairs, as its answers all tie, and the run ends with
            # "the prompt set ran out".)
            "evaluation": {"margin_se": 0.0},
        },
    )
    stack = stack_settings.model_copy(update={"served_model_name": "SmolLM2-135M-Instruct"})
    runner = Runner(settings, stack, status=lambda *a, **k: None)
    prefix = f"onpolicy.{runner.run_id}."
    try:
        report = runner.run()
    except RuntimeError as e:
        # Say what the evaluator decided: a run that fails here mostly failed there.
        seen = [
            (r.message.version, r.message.verdict, round(r.message.mean, 3), round(r.message.se, 3))
            for r in read_topic(kafka, prefix + "evals", m.EvalResult)
        ]
        raise AssertionError(f"the run failed ({e}); evaluations: {seen}") from e

    evals = {
        r.message.version: r.message for r in read_topic(kafka, prefix + "evals", m.EvalResult)
    }
    assert sorted(evals) == [0, 1, 2]
    v0, v1 = evals[0], evals[1]
    assert v0.verdict == "promoted" and v0.complete
    assert v1.verdict == "rejected", (v0.mean, v0.se, v1.mean, v1.se)
    assert v1.best_version == 0 and v1.mean < v0.mean

    updates = {
        u.message.version: u.message for u in read_topic(kafka, prefix + "policy", m.PolicyUpdate)
    }
    assert sorted(updates) == [1, 2]
    assert updates[1].num_pairs > 0 and not updates[1].HasField("restored_version")
    rollback = updates[2]
    assert (rollback.restored_version, rollback.rejected_version) == (0, 1)
    assert rollback.num_pairs == 0
    # v0 restored: every LoRA B matrix of v2's adapter is zero, so it serves the base model.
    weights = load_file(str(Path(rollback.adapter_uri) / "adapter_model.safetensors"))
    b = [t for name, t in weights.items() if "lora_B" in name]
    assert b and all(float(t.abs().max()) == 0.0 for t in b)

    # Round 1 was sampled by v1: its pairs were dropped (rolled_back), none trained.
    rounds = report["rounds"]
    assert rounds[1]["restored_version"] == 0 and rounds[1]["eval_verdict"] == "rejected"
    trainer = (runner.run_dir / "onpolicy" / "trainer.metrics.txt").read_text()
    assert sample(trainer, "onpolicy_trainer_policy_rollbacks_total") == 1
    assert sample(trainer, "onpolicy_trainer_eval_rejected", version="1") == 1
    dropped = sample(trainer, "onpolicy_trainer_pairs_dropped_total", reason="rolled_back")
    pairs = [r.message for r in read_topic(kafka, prefix + "pairs", m.PreferencePair)]
    assert dropped == sum(p.policy_version == 1 for p in pairs)
    assert rounds[1]["pairs"] == 0  # trained none
    assert not [p for p in pairs if p.policy_version == 1 and p.id in trained_ids(runner)]
    # The sampler serves the restored weights: the held-out prompts were sampled by v2.
    groups = [r.message for r in read_topic(kafka, prefix + "completions", m.CompletionGroup)]
    assert {g.policy_version for g in groups if g.prompt.dataset_split == "eval"} == {0, 1, 2}
    assert report["rounds"][-1]["policy_version"] == 2
    # v2 has v0's weights: the guard keeps it whatever its noise (never a second rollback).
    assert evals[2].mean > v1.mean
