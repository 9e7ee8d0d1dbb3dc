"""No secret in a run folder: settings files are redacted and 0600, secrets travel by env."""

from __future__ import annotations

import contextlib
import json
import stat

import pytest
import yaml

from onpolicy.run import runner as runner_mod
from onpolicy.run.lineage import Lineage, RoundRecord
from onpolicy.run.runner import Runner, Stack
from onpolicy.run.settings import RunSettings
from onpolicy.secrets import REDACTED, open_private, redact, split_secrets
from onpolicy.settings import KafkaSettings, load_settings
from onpolicy.stack import StackSettings
from onpolicy_judge.settings import JudgeSettings
from onpolicy_sampler.settings import SamplerSettings

PASSWORD = "sasl-pw-3f9a1c"
API_KEY = "sk-judge-7d2e40"
VLLM_KEY = "vllm-key-b81c55"


def test_a_run_writes_no_secret_into_its_folder_and_the_services_still_get_them(
    tmp_path, monkeypatch
):
    @contextlib.contextmanager
    def no_stack(run, stack, status):
        yield Stack(run.kafka, "http://127.0.0.1:9", "m", tmp_path / "model", None)

    seen: list[Lineage] = []

    def one_round(self, lineage):
        seen.append(lineage)
        lineage.rounds.append(RoundRecord(round=0, policy_version=0, eval_reward_mean=0.4))

    monkeypatch.setattr(runner_mod, "local_stack", no_stack)
    monkeypatch.setattr(Lineage, "start", lambda self: None)
    monkeypatch.setattr(Lineage, "stop", lambda self: None)
    monkeypatch.setattr(Runner, "on_policy", one_round)
    kafka = KafkaSettings(
        bootstrap_servers="127.0.0.1:9",
        security_protocol="SASL_SSL",
        sasl_mechanism="SCRAM-SHA-512",
        sasl_username="onpolicy",
        sasl_password=PASSWORD,
    )
    settings = load_settings(
        RunSettings,
        kafka=kafka,
        runs_dir=tmp_path / "runs",
        run_id="secret",
        rounds=1,
        prompts_per_round=2,
        eval_size=2,
        judge={"backend": "llm", "llm": {"api_key": API_KEY, "model": "judge-model"}},
        sampler={"vllm_api_key": VLLM_KEY},
    )
    runner = Runner(settings, StackSettings(state_dir=tmp_path / "stack"), status=lambda *a, **k: 0)
    runner.run()

    files = [p for p in runner.run_dir.rglob("*") if p.is_file()]
    names = {p.relative_to(runner.run_dir).as_posix() for p in files}
    assert {"settings.json", "onpolicy/config.yaml", "report.json"} <= names
    for path in files:
        data = path.read_bytes()
        for secret in (PASSWORD, API_KEY, VLLM_KEY):
            assert secret.encode() not in data, f"{secret} written to {path}"
    for name in ("settings.json", "onpolicy/config.yaml"):
        assert stat.S_IMODE((runner.run_dir / name).stat().st_mode) == 0o600, name

    written = json.loads((runner.run_dir / "settings.json").read_text())
    assert written["kafka"]["sasl_password"] == REDACTED
    assert written["judge"]["llm"] == {"api_key": REDACTED, "model": "judge-model"}
    config = yaml.safe_load((runner.run_dir / "onpolicy/config.yaml").read_text())
    assert "sasl_password" not in config["kafka"]
    assert config["kafka"]["sasl_username"] == "onpolicy"
    assert config["judge"]["llm"] == {"model": "judge-model"}

    # What each service process would read: its environment plus the config file.
    [lineage] = seen
    for name, value in lineage.services["judge"].env.items():
        monkeypatch.setenv(name, value)
    judge = load_settings(JudgeSettings)
    assert judge.llm.api_key is not None and judge.llm.api_key.get_secret_value() == API_KEY
    assert judge.llm.model == "judge-model" and judge.backend == "llm"
    assert judge.kafka.sasl_password.get_secret_value() == PASSWORD  # type: ignore[union-attr]
    assert judge.kafka.sasl_username == "onpolicy"
    sampler = load_settings(SamplerSettings)
    assert sampler.vllm_api_key.get_secret_value() == VLLM_KEY  # type: ignore[union-attr]
    assert sampler.kafka.sasl_password.get_secret_value() == PASSWORD  # type: ignore[union-attr]


def test_split_and_redact_take_out_secret_named_strings_only():
    data = {
        "llm": {"api_key": "k", "api_key_file": "/run/secrets/k", "api_key_env": "OPENAI_API_KEY"},
        "hub_token": "t",
        "max_tokens": 5,
        "password": "",
    }
    kept, env = split_secrets(data, "ONPOLICY_JUDGE_")
    assert env == {"ONPOLICY_JUDGE_LLM__API_KEY": "k", "ONPOLICY_JUDGE_HUB_TOKEN": "t"}
    assert kept == {
        "llm": {"api_key_file": "/run/secrets/k", "api_key_env": "OPENAI_API_KEY"},
        "max_tokens": 5,
    }
    assert redact(data) == {
        **data,
        "llm": {**data["llm"], "api_key": REDACTED},
        "hub_token": REDACTED,
    }


@pytest.mark.parametrize("mode", ["ab", "wb"])
def test_service_logs_are_created_owner_only(tmp_path, mode):
    path = tmp_path / "judge.log"
    with open_private(path, mode) as log:
        log.write(b"x\n")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
