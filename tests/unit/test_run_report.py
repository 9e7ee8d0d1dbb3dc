"""The run's report when a stage fails: the finished rounds are kept and the error is named."""

from __future__ import annotations

import contextlib
import json

import pytest

from onpolicy.run import runner as runner_mod
from onpolicy.run.lineage import Lineage, RoundRecord
from onpolicy.run.runner import Runner, Stack
from onpolicy.run.settings import RunSettings
from onpolicy.settings import KafkaSettings, load_settings
from onpolicy.stack import StackSettings


@pytest.fixture
def runner(tmp_path, monkeypatch):
    @contextlib.contextmanager
    def no_stack(run, stack, status):
        # Nothing is started: the lineage's start/stop are stubbed below.
        yield Stack(run.kafka, "http://127.0.0.1:9", "m", tmp_path / "model", None)

    monkeypatch.setattr(runner_mod, "local_stack", no_stack)
    monkeypatch.setattr(Lineage, "start", lambda self: None)
    monkeypatch.setattr(Lineage, "stop", lambda self: None)
    settings = load_settings(
        RunSettings,
        kafka=KafkaSettings(bootstrap_servers="127.0.0.1:9"),
        runs_dir=tmp_path / "runs",
        run_id="failing",
        rounds=2,
        prompts_per_round=2,
        eval_size=2,
    )
    return Runner(
        settings, StackSettings(state_dir=tmp_path / "stack"), status=lambda *a, **k: None
    )


def test_a_failed_stage_still_writes_the_report_of_the_finished_rounds(runner, monkeypatch):
    def one_round_then_timeout(self, lineage):
        lineage.rounds.append(
            RoundRecord(
                round=0, policy_version=0, pairs=3, eval_reward_mean=0.5, eval_reward_se=0.1
            )
        )
        raise TimeoutError("timed out after 1800s waiting for round 1 samples")

    monkeypatch.setattr(Runner, "on_policy", one_round_then_timeout)
    with pytest.raises(TimeoutError, match="round 1 samples"):
        runner.run()
    report = json.loads((runner.run_dir / "report.json").read_text())
    assert report["error"] == "TimeoutError: timed out after 1800s waiting for round 1 samples"
    assert not report["interrupted"] and report["loop_s"] is None
    assert [(r["round"], r["pairs"], r["eval_reward_mean"]) for r in report["rounds"]] == [
        (0, 3, 0.5)
    ]
    assert (runner.run_dir / "report.png").stat().st_size > 0


def test_a_finished_run_reports_no_error(runner, monkeypatch):
    def one_round(self, lineage):
        lineage.rounds.append(RoundRecord(round=0, policy_version=0, eval_reward_mean=0.4))

    monkeypatch.setattr(Runner, "on_policy", one_round)
    report = runner.run()
    assert report["error"] is None
    assert json.loads((runner.run_dir / "report.json").read_text())["error"] is None


def test_onpolicy_run_says_where_the_report_is_when_a_stage_fails(tmp_path, monkeypatch, capsys):
    from onpolicy import cli

    def timeout(self):
        raise TimeoutError("timed out after 1800s waiting for round 0 samples")

    monkeypatch.setattr(Runner, "run", timeout)
    monkeypatch.chdir(tmp_path)
    code = cli.main(["run", "--rounds", "1", "--prompts-per-round", "2", "--eval-size", "2"])
    assert code == 1
    out = capsys.readouterr()
    said = " ".join((out.out + out.err).split())  # the console wraps long lines
    assert "run failed: timed out after 1800s waiting for round 0 samples" in said
    assert "report.json" in said
