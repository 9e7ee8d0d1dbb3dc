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


def run_settings(argv, config=None, command="run"):
    """The RunSettings ``onpolicy COMMAND ARGV`` would use (parsing and merging only)."""
    from onpolicy import cli

    prefix = [] if config is None else ["--config", str(config)]
    return cli.run_settings(cli.build_parser().parse_args([*prefix, command, *argv]))


def test_demo_runs_the_instructions_task_and_run_keeps_concise(tmp_path):
    s = run_settings([], command="demo")
    assert s.task == "instructions" and s.prompts.name == "instructions_prompts.jsonl"
    assert s.eval_prompts.name == "instructions_eval_prompts.jsonl"
    assert s.judge["functions"][0]["name"] == "instructions"
    plain = run_settings([])  # `onpolicy run`: as before the task existed
    assert plain.task == "concise" and plain.prompts.name == "demo_prompts.jsonl"
    assert plain.judge["functions"] == [{"name": "concise"}]
    assert run_settings(["--task", "concise"], command="demo").task == "concise"
    config = tmp_path / "c.yaml"
    config.write_text("run:\n  task: concise\n")
    assert run_settings([], config, command="demo").task == "concise"  # the YAML's choice
    # The demo reuses its prompts (the content gate makes many ties); `run` does not.
    assert s.prompt_epochs and not plain.prompt_epochs
    # ... and samples each held-out prompt four times (the gain's SE is mostly sampling noise).
    assert s.eval_samples == 4 and plain.eval_samples == 2
    config.write_text("run:\n  prompt_epochs: false\n")
    assert not run_settings([], config, command="demo").prompt_epochs
    # The demo's measured recipe: 40 pairs a round at lr 2e-3; `run` keeps 24 at 3e-3.
    assert s.prompts_per_round == 40 and plain.prompts_per_round == 24
    assert s.trainer["learning_rate"] == 2e-3 and plain.trainer["learning_rate"] == 3e-3
    assert run_settings(["--prompts-per-round", "8"], command="demo").prompts_per_round == 8
    config.write_text("run:\n  trainer: {learning_rate: 1.0e-3}\n")
    assert run_settings([], config, command="demo").trainer == {"learning_rate": 1e-3}


def test_judge_flag_takes_function_specs():
    s = run_settings(["--judge", "concise"])
    assert s.judge == {"backend": "function", "functions": [{"name": "concise"}]}
    s = run_settings(["--judge", "mymodule:score, length"])
    assert [f["name"] for f in s.judge["functions"]] == ["mymodule:score", "length"]


def test_llm_judge_flags_name_the_token_variable_never_the_token():
    s = run_settings(
        [
            "--judge-url",
            "https://api.example.com/v1",
            "--judge-model",
            "gpt-x",
            "--judge-token-env",
            "MY_TOKEN",
        ]
    )
    assert s.judge["backend"] == "llm"
    assert s.judge["llm"] == {
        "base_url": "https://api.example.com/v1",
        "model": "gpt-x",
        "api_key_env": "MY_TOKEN",
    }


def test_reward_model_flag(tmp_path):
    s = run_settings(["--reward-model", str(tmp_path)])
    assert s.judge["backend"] == "reward_model" and s.judge["reward_model"] == {
        "model": str(tmp_path)
    }


def test_judge_flags_go_over_the_yaml_judge_section(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("run:\n  judge:\n    pairs: {min_margin: 0.2}\n    llm: {temperature: 0.5}\n")
    s = run_settings(["--judge-url", "http://127.0.0.1:9/v1"], config)
    assert s.judge["pairs"] == {"min_margin": 0.2}  # the YAML's other settings stay
    assert s.judge["llm"] == {"temperature": 0.5, "base_url": "http://127.0.0.1:9/v1"}


def test_judge_flags_exclude_each_other_and_llm_options_need_a_url():
    result = run(["-m", "onpolicy.cli", "run", "--judge", "concise", "--reward-model", "x"])
    assert result.returncode == 2 and "not allowed with argument" in result.stderr
    result = run(["-m", "onpolicy.cli", "run", "--judge-model", "gpt-x"])
    assert result.returncode == 2 and "--judge-model" in result.stderr
    assert "--judge-url" in result.stderr


def test_run_help_lists_the_judge_flags():
    result = run(["-m", "onpolicy.cli", "run", "--help"])
    assert result.returncode == 0
    for flag in (
        "--task",
        "--judge SPEC",
        "--judge-url",
        "--judge-model",
        "--reward-model",
        "--judge-token-env",
    ):
        assert flag in result.stdout
