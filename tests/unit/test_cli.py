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


def test_progress_is_printed_as_lines_without_a_terminal(capsys):
    from onpolicy import cli

    status = cli._Status(every_s=3600)
    with status:
        status("[r] round 1: sampling 1/8 groups, 90 tok/s")
        status("[r] round 1: sampling 2/8 groups, 95 tok/s")  # same stage, too soon
        status("[r] round 1: judging 8/8 groups, 95 tok/s")
        status("round table", final=True)
    out = capsys.readouterr().err  # progress goes to stderr, results to stdout
    assert "sampling 1/8" in out and "judging 8/8" in out and "round table" in out
    assert "sampling 2/8" not in out
