"""A real ``onpolicy run`` survives a service killed with SIGKILL mid-run."""

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

pytestmark = [pytest.mark.e2e, pytest.mark.vllm]


def test_a_judge_killed_mid_run_is_restarted_and_the_run_completes(
    kafka, vllm, model_dir, stack_settings, tmp_path, monkeypatch
):
    killed: dict[str, object] = {}
    start = Lineage.start

    def start_then_kill_the_judge(self: Lineage) -> None:
        start(self)

        def kill() -> None:
            # Mid-run: once the sampler has produced groups, the judge is working on them.
            deadline = time.monotonic() + 600
            while time.monotonic() < deadline:
                groups = list(read_topic(kafka, self.topics.name("completions"), m.CompletionGroup))
                if groups:
                    break
                time.sleep(0.5)
            judge = self.services["judge"]
            killed["pid"] = judge.proc.pid
            killed["scored_before"] = len(
                list(read_topic(kafka, self.topics.name("scored"), m.ScoredGroup))
            )
            os.kill(judge.proc.pid, signal.SIGKILL)

        killer = threading.Thread(target=kill, daemon=True)
        killer.start()
        killed["thread"] = killer

    monkeypatch.setattr(Lineage, "start", start_then_kill_the_judge)
    vllm.start()
    settings = load_settings(
        RunSettings,
        kafka=kafka,
        external_stack=True,
        vllm_url=vllm.url,
        model=model_dir,
        rounds=1,
        prompts_per_round=6,
        eval_size=2,
        eval_samples=2,
        num_samples=3,
        max_tokens=40,
        runs_dir=tmp_path / "runs",
        run_id="judge-killed",
        restart_backoff_s=0.5,
        trainer={"max_length": 192, "max_prompt_length": 96, "per_device_batch_size": 2},
    )
    stack = stack_settings.model_copy(update={"served_model_name": "SmolLM2-135M-Instruct"})
    runner = Runner(settings, stack, status=lambda *a, **k: None)
    report = runner.run()

    assert "pid" in killed, "the judge was never killed"
    assert report["error"] is None and not report["interrupted"]
    [restart] = report["restarts"]
    assert (restart["lineage"], restart["service"]) == ("onpolicy", "judge")
    assert restart["exit_code"] == -signal.SIGKILL
    assert restart["restart"] == 1 and restart["exited_at"]
    # Every group was judged, the killed judge's unfinished ones by its successor.
    first, last = report["rounds"]
    assert first["train_groups"] == 6 and first["eval_reward_mean"] is not None
    assert last["eval_reward_mean"] is not None
    assert last["policy_version"] == (1 if first["pairs"] else 0)
    log = (runner.run_dir / "onpolicy" / "judge.log").read_text()
    assert "--- onpolicy run: judge exited with -9" in log
