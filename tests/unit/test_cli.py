"""Settings errors at the command line: exit code 2 and the field named."""

import os
import subprocess
import sys


def run(args, **env):
    return subprocess.run(
        [sys.executable, *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **env},
    )


def test_bad_stack_setting_exits_2_naming_the_field():
    result = run(["-m", "onpolicy.cli", "status"], ONPOLICY_STACK_KAFKA_PORT="abc")
    assert result.returncode == 2
    assert "kafka_port" in result.stderr and "ONPOLICY_STACK_KAFKA_PORT" in result.stderr


def test_bad_service_setting_exits_2_naming_the_field():
    result = run(["-m", "onpolicy_sampler"], ONPOLICY_SAMPLER_CONCURRENCY="0")
    assert result.returncode == 2
    assert "concurrency" in result.stderr and "greater than or equal to 1" in result.stderr
    assert "ONPOLICY_SAMPLER_CONCURRENCY" in result.stderr


def test_service_help_lists_settings_with_their_variables():
    result = run(["-m", "onpolicy_sampler", "--help"])
    assert result.returncode == 0
    assert "ONPOLICY_SAMPLER_VLLM_URL=" in result.stdout
    assert "ONPOLICY_SAMPLER_KAFKA__BOOTSTRAP_SERVERS=" in result.stdout
