"""A real ``onpolicy run`` survives its services killed with SIGKILL mid-run."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from onpolicy import messages as m
from onpolicy.bus import read_topic
from onpolicy.run.lineage import Lineage
from onpolicy.run.runner import Runner
from onpolicy.run.settings import RunSettings
from onpolicy.settings import load_settings

# A whole run per module fixture: generous for a loaded machine (about 4 min alone on 2 cores).
pytestmark = [pytest.mark.e2e, pytest.mark.vllm, pytest.mark.timeout(1800)]


def test_a_judge_and_a_trainer_killed_mid_run_are_restarted_and_the_run_completes(
    kafka, vllm, model_dir, stack_settings, tmp_path, monkeypatch
):
    """One run, two kills (to keep the wall time down): the judge once the sampler has
    produced groups (it is judging them), the trainer 2 s into the round its planner handed
    it (the restarted trainer recomputes the round from Kafka and trains it)."""
    killed: dict[str, int] = {}
    lineages: list[Lineage] = []
    start = Lineage.start

    def kill(lineage: Lineage, service: str) -> None:
        proc = lineage.services[service].proc
        killed[service] = proc.pid
        os.kill(proc.pid, signal.SIGKILL)

    def start_then_kill_the_judge(self: Lineage) -> None:
        start(self)
        lineages.append(self)

        def when_sampled() -> None:
            deadline = time.monotonic() + 600
            while time.monotonic() < deadline:
                if list(read_topic(kafka, self.topics.name("completions"), m.CompletionGroup)):
                    kill(self, "judge")
                    break
                time.sleep(0.5)
            # The trainer, 2 s into the round its planner handed it.
            log = self.services["trainer"].log_file
            while time.monotonic() < deadline:
                if "training round 1 on" in log.read_text():
                    time.sleep(2.0)
                    kill(self, "trainer")
                    return
                time.sleep(0.5)

        threading.Thread(target=when_sampled, daemon=True).start()

    monkeypatch.setattr(Lineage, "start", start_then_kill_the_judge)
    vllm.start()
    settings = load_settings(
        RunSettings,
        kafka=kafka,
        external_stack=True,
        vllm_url=vllm.url,
        model=model_dir,
        rounds=1,
        prompts_per_round=3,
        eval_size=2,
        eval_samples=2,
        num_samples=3,
        max_tokens=48,
        max_prompt_tokens=96,  # the demo's prompts have at most 60 tokens
        runs_dir=tmp_path / "runs",
        run_id="killed",
        restart_backoff_s=0.5,
        trainer={"max_length": 144, "per_device_batch_size": 2},
    )
    stack = stack_settings.model_copy(update={"served_model_name": "SmolLM2-135M-Instruct"})
    runner = Runner(settings, stack, status=lambda *a, **k: None)
    report = runner.run()

    assert report["error"] is None and not report["interrupted"]
    first, last = report["rounds"]
    assert first["pairs"] > 0, "no pairs: nothing trained, the trainer was never killed"
    assert set(killed) == {"judge", "trainer"}
    restarts = {r["service"]: r for r in report["restarts"]}
    assert sorted(restarts) == ["judge", "trainer"] and len(report["restarts"]) == 2
    for service, restart in restarts.items():
        assert restart["lineage"] == "onpolicy" and restart["restart"] == 1
        assert restart["exit_code"] == -signal.SIGKILL and restart["exited_at"]
        log = (runner.run_dir / "onpolicy" / f"{service}.log").read_text()
        assert f"--- onpolicy run: {service} exited with -9" in log
    # Every group was judged (the killed judge's unfinished ones by its successor), and the
    # round the killed trainer lost was trained by the next one: v1 is what round 1 sampled.
    assert first["train_groups"] >= 3 and first["eval_reward_mean"] is not None
    assert last["policy_version"] == 1 and last["eval_reward_mean"] is not None
    assert first["train_metrics"]
    trainer_log = (runner.run_dir / "onpolicy" / "trainer.log").read_text()
    before, after = trainer_log.split("--- onpolicy run: trainer exited with -9")
    assert "training round 1 on" in before  # the planner had handed it the round ...
    assert "DPO round on" not in before  # ... and it was killed mid-round (CPU: well over 2 s)
    assert after.count("DPO round on") == 1 and "published policy-v1" in after
