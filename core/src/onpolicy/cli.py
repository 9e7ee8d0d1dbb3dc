"""The ``onpolicy`` command: the local stack, topics and a look at what is running."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

from rich.console import Console
from rich.table import Table

from onpolicy.settings import ConfigError, load_settings

console = Console(stderr=True)


def _stack_settings(args: argparse.Namespace):  # -> StackSettings (imported lazily: fast --help)
    from onpolicy.stack import StackSettings

    return load_settings(StackSettings, config_file=args.config)


def cmd_up(args: argparse.Namespace) -> int:
    from onpolicy.bus import ensure_topics
    from onpolicy.secrets import write_private
    from onpolicy.stack import KafkaBroker, VllmServer, ensure_default_model

    settings = _stack_settings(args)
    kafka = settings.kafka
    if settings.external_kafka:
        console.print(f"using the Kafka cluster at [bold]{kafka.bootstrap_servers}[/]")
    else:
        broker = KafkaBroker(settings)
        with console.status("starting Apache Kafka (KRaft, single node)..."):
            seconds = broker.start()
        kafka = broker.client()  # the admin's login when secured: it creates the topics
        console.print(f"[green]kafka[/] ready at {broker.bootstrap} ({seconds:.1f}s)")
    created = ensure_topics(kafka, settings.topics)
    console.print(
        f"[green]topics[/] {settings.topics.prefix}* ready"
        + (f" (created {len(created)})" if created else "")
    )

    env = {"ONPOLICY_KAFKA__BOOTSTRAP_SERVERS": kafka.bootstrap_servers}
    if not settings.external_kafka and broker.security is not None:
        from onpolicy.stack.kafka_acls import SERVICE_PRINCIPALS

        # Each service logs in as itself; the stack's own commands (status, topics, publish)
        # as the admin. The publisher's password is in kafka-security/credentials.json.
        env |= broker.security.shared_env()
        for service in SERVICE_PRINCIPALS:
            env |= broker.security.login_env(service, service)
        env |= broker.security.login_env("admin", "stack")
    if not args.kafka_only:
        with console.status("preparing the model and the vLLM environment (first run: minutes)..."):
            model = ensure_default_model(settings)
        server = VllmServer(settings, model)
        with console.status(f"starting vLLM for {settings.served_model_name}..."):
            seconds = server.start()
        console.print(
            f"[green]vllm[/] ready at {server.url} serving "
            f"{settings.served_model_name} from {model} ({seconds:.1f}s)"
        )
        env |= {
            "ONPOLICY_VLLM_URL": server.url,
            "ONPOLICY_MODEL_PATH": str(model),
            "ONPOLICY_SERVED_MODEL_NAME": settings.served_model_name,
            # vLLM's --max-lora-rank: the sampler and the trainer check adapters against it.
            "ONPOLICY_MAX_LORA_RANK": str(settings.max_lora_rank),
            # How vLLM was started (LoRA or dev mode): the sampler and the trainer follow it.
            "ONPOLICY_HANDOFF": settings.handoff,
        }
    settings.state.mkdir(parents=True, exist_ok=True)
    env_file = settings.state / "stack.env"
    # Private: when the broker is secured, it holds the services' passwords.
    write_private(env_file, "".join(f"export {k}={v}\n" for k, v in env.items()))
    console.print(f"environment for the services: [bold]source {env_file}[/]")
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    from onpolicy.stack import ensure_default_model, ensure_vllm_env
    from onpolicy.stack.kafka import ensure_kafka_jars

    settings = _stack_settings(args)
    with console.status("fetching Apache Kafka's jars..."):
        libs = ensure_kafka_jars(settings)
    console.print(f"[green]kafka[/] jars in {libs}")
    if not args.kafka_only:
        with console.status("installing vLLM in its own environment..."):
            python = ensure_vllm_env(settings)
        console.print(f"[green]vllm[/] environment {python.parent.parent}")
        with console.status("converting the default model..."):
            model = ensure_default_model(settings)
        console.print(f"[green]model[/] {model}")
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    from onpolicy.stack import KafkaBroker
    from onpolicy.stack.process import ManagedProcess

    settings = _stack_settings(args)
    stopped = ManagedProcess("vllm", settings.state).stop(timeout=30)
    console.print("[yellow]vllm[/] stopped" if stopped else "vllm was not running")
    broker = KafkaBroker(settings)
    stopped = broker.stop()
    console.print("[yellow]kafka[/] stopped" if stopped else "kafka was not running")
    if args.wipe:
        broker.wipe()
        console.print(f"wiped {broker.data}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from onpolicy.stack import KafkaBroker
    from onpolicy.stack.kafka import port_open
    from onpolicy.stack.process import ManagedProcess

    settings = _stack_settings(args)
    table = Table("component", "pid", "address", "state")
    kafka = ManagedProcess("kafka", settings.state)
    broker = KafkaBroker(settings)
    table.add_row(
        "kafka",
        str(kafka.pid() or "-"),
        broker.bootstrap,
        "up" if port_open("127.0.0.1", settings.kafka_port) else "down",
    )
    vllm = ManagedProcess("vllm", settings.state)
    import httpx

    try:
        up = httpx.get(f"{settings.vllm_url}/v1/models", timeout=2).status_code == 200
    except httpx.HTTPError:
        up = False
    table.add_row("vllm", str(vllm.pid() or "-"), settings.vllm_url, "up" if up else "down")
    out = Console()
    out.print(table)
    if not port_open("127.0.0.1", settings.kafka_port) and not settings.external_kafka:
        return 0
    from onpolicy.run.monitor import pipeline_status

    kafka = settings.kafka
    if not settings.external_kafka:
        kafka = kafka.model_copy(update={"bootstrap_servers": broker.bootstrap})
    try:
        stages, version = pipeline_status(kafka, settings.topics)
    except Exception as exc:  # a cluster without our topics yet
        out.print(f"pipeline: unavailable ({exc})")
        return 0
    lag = Table("stage (group)", "topic", "records", "committed", "lag", "records/s")
    for st in stages:
        lag.add_row(
            st.group,
            st.topic,
            str(st.end),
            str(st.committed),
            str(st.lag),
            f"{st.records_per_s:.1f}",
        )
    out.print(lag)
    out.print(f"current policy version: [bold]{version}[/]")
    return 0


def cmd_topics(args: argparse.Namespace) -> int:
    from onpolicy.bus import ensure_topics

    settings = _stack_settings(args)
    created = ensure_topics(settings.kafka, settings.topics)
    console.print(f"created {', '.join(created)}" if created else "all topics exist")
    return 0


class _Status:
    """One live status line for long work; ``final=True`` prints a line that stays.

    Without a terminal (CI, ``kubectl logs``, a file) a live line shows nothing, so progress
    is printed as plain lines instead: on each new stage and at most every ``every_s``.
    """

    def __init__(self, every_s: float = 15.0) -> None:
        self._status = console.status("starting")
        self._live = console.is_terminal
        self._every_s = every_s
        self._last_key = ""
        self._last_at = 0.0

    def __enter__(self) -> _Status:
        if self._live:
            self._status.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._live:
            self._status.__exit__(*exc)

    def __call__(self, message: str, final: bool = False) -> None:
        if final:
            console.print(message)
        elif self._live:
            self._status.update(message)
        else:
            head, _, rest = message.partition(":")
            key = f"{head}:{rest.split()[0] if rest.split() else ''}"  # e.g. "round 2: judging"
            now = time.monotonic()
            if key != self._last_key or now - self._last_at >= self._every_s:
                console.print(message, highlight=False)
                self._last_key, self._last_at = key, now


RUN_FLAGS = {
    "rounds": int,
    "prompts_per_round": int,
    "eval_size": int,
    "num_samples": int,
    "max_tokens": int,
    "max_staleness": int,
    "run_id": str,
    "runs_dir": Path,
    "prompts": Path,
    "eval_prompts": Path,
    "seed": int,
    "task": str,
}


def judge_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The judge section the judge flags ask for (empty: none given).

    ``--judge`` a function spec (a built-in name or module:function; several, comma
    separated, are averaged), ``--judge-url`` an LLM judge behind an OpenAI-compatible
    endpoint (``--judge-model``, the token read from the variable ``--judge-token-env``
    names, never from the command line), ``--reward-model`` a sequence-classification folder.
    """
    url_only = [f for f in ("judge_model", "judge_token_env") if getattr(args, f, None) is not None]
    if url_only and not args.judge_url:
        raise ConfigError(
            f"--{url_only[0].replace('_', '-')} is a setting of the LLM judge: give --judge-url too"
        )
    if args.judge:
        names = [n.strip() for n in args.judge.split(",") if n.strip()]
        if not names:
            raise ConfigError("--judge: name at least one scorer (e.g. --judge instructions)")
        return {"backend": "function", "functions": [{"name": n} for n in names]}
    if args.judge_url:
        llm: dict[str, Any] = {"base_url": args.judge_url}
        if args.judge_model:
            llm["model"] = args.judge_model
        if args.judge_token_env:
            llm["api_key_env"] = args.judge_token_env
        return {"backend": "llm", "llm": llm}
    if args.reward_model:
        return {"backend": "reward_model", "reward_model": {"model": str(args.reward_model)}}
    return {}


def merge_judge(base: dict[str, Any], flags: dict[str, Any]) -> dict[str, Any]:
    """The YAML's judge section with the flags' on top, one level deep (llm.* kept)."""
    out = dict(base)
    for key, value in flags.items():
        old = out.get(key)
        out[key] = {**old, **value} if isinstance(old, dict) and isinstance(value, dict) else value
    return out


def run_settings(args: argparse.Namespace):  # -> RunSettings
    """``onpolicy run``'s settings: the YAML file and environment, the flags over them."""
    from onpolicy.run.settings import DEMO_DEFAULTS, RunSettings

    overrides = {k: getattr(args, k) for k in RUN_FLAGS if getattr(args, k, None) is not None}
    if args.compare_offpolicy:
        overrides["compare_offpolicy"] = True
    if args.external_stack:
        overrides["external_stack"] = True
    settings = load_settings(RunSettings, config_file=args.config, **overrides)
    if args.command == "demo":  # the demo's defaults where no flag, YAML or variable set one
        missing = {k: v for k, v in DEMO_DEFAULTS.items() if k not in settings.model_fields_set}
        if missing:
            overrides |= missing
            settings = load_settings(RunSettings, config_file=args.config, **overrides)
    if judge := judge_overrides(args):
        # Over the judge section of the YAML file (its pairs.*, llm.* settings stay).
        overrides["judge"] = merge_judge(settings.judge, judge)
        settings = load_settings(RunSettings, config_file=args.config, **overrides)
    return settings


def cmd_run(args: argparse.Namespace) -> int:
    from onpolicy.run.prompts import PromptFileError
    from onpolicy.run.runner import Runner
    from onpolicy.stack import StackSettings

    settings = run_settings(args)
    stack = load_settings(StackSettings, config_file=args.config)
    try:
        runner = Runner(settings, stack)
    except (PromptFileError, ValueError) as exc:
        console.print(str(exc), style="red", markup=False, highlight=False)
        return 2
    console.print(f"run [bold]{runner.run_id}[/] -> {runner.run_dir}")
    try:
        with _Status() as status:
            runner.status = status
            report = runner.run()
    except (TimeoutError, RuntimeError) as exc:
        # A stage that timed out or a service that died: the report keeps what finished.
        console.print(
            f"run failed: {exc}\nthe rounds that finished are in {runner.run_dir / 'report.json'}"
            f"; service logs in {runner.run_dir}/*/",
            style="red",
            markup=False,
            highlight=False,
        )
        return 1
    print_rounds(report)
    for r in report.get("restarts", []):
        console.print(
            f"restarted {r['lineage']} {r['service']}: it exited with {r['exit_code']} at "
            f"{r['exited_at']} after {r['uptime_s']:.0f}s",
            style="yellow",
            markup=False,
            highlight=False,
        )
    console.print(
        f"report: {runner.run_dir / 'report.json'}, plot: {runner.run_dir / 'report.png'}"
        f", pairs: {runner.run_dir / 'pairs.parquet'}"
    )
    return 130 if report["interrupted"] else 0


def print_rounds(report: dict) -> None:
    for name, rounds in report["lineages"].items():
        table = Table(
            "round",
            "policy",
            "pairs",
            "eval reward",
            "eval tokens",
            "ended ok",
            "sample s",
            "judge s",
            "train s",
            "load s",
            title=name,
        )
        for r in rounds:
            reward = (
                "-"
                if r["eval_reward_mean"] is None
                else f"{r['eval_reward_mean']:.3f} ± {r['eval_reward_se']:.3f}"
            )
            tokens = (
                "-"
                if r["eval_completion_tokens_mean"] is None
                else f"{r['eval_completion_tokens_mean']:.0f}"
            )
            ended = "-" if r["eval_finished_rate"] is None else f"{r['eval_finished_rate']:.0%}"
            table.add_row(
                str(r["round"]),
                f"v{r['policy_version']}",
                str(r["pairs"]),
                reward,
                tokens,
                ended,
                f"{r['sampling_s']:.0f}",
                f"{r['judging_s']:.0f}",
                f"{r['training_s']:.0f}",
                f"{r['loading_s']:.1f}",
            )
        out = Console()
        if not out.is_terminal:  # piped or logged, rich assumes 80 columns and squeezes it
            out = Console(width=120)
        out.print(table)
    if "eval_reward_gain" in report:
        Console().print(
            f"evaluation reward change, first to last: "
            f"[bold]{report['eval_reward_gain']:+.3f}[/] in {report['wall_s']:.0f}s"
        )
    if "overlap_saved_s" in report:
        Console().print(
            f"overlap mode: {report['overlap_saved_s']:.0f}s of sampling ran while the trainer "
            "trained (wall time saved against strict mode, at the speeds seen)"
        )


def cmd_publish(args: argparse.Namespace) -> int:
    from onpolicy.bus import Producer, ensure_topics
    from onpolicy.run.prompts import PromptFileError, load_prompts
    from onpolicy.stack import StackSettings

    settings = load_settings(StackSettings, config_file=args.config)
    try:
        source = load_prompts(args.file)
    except PromptFileError as exc:
        console.print(str(exc), style="red", markup=False, highlight=False)
        return 1
    if settings.topics.create:
        ensure_topics(settings.kafka, settings.topics)
    producer = Producer(settings.kafka, client_id="onpolicy-publish")
    topic = settings.topics.name("heldout" if args.heldout else "prompts")
    prompts = source.prompts
    if args.heldout:  # marked in the record too, though the samplers mark what they take
        for p in prompts:
            p.dataset_split = "eval"
    try:
        futures = [producer.send(topic, p) for p in prompts]
        for future in futures:
            future.result(120)  # every record acknowledged, or the error surfaces
    finally:
        producer.close()
    console.print(f"published {len(futures)} prompts to {topic}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from onpolicy import messages as m
    from onpolicy.bus import read_topic
    from onpolicy.run.report import pair_rows, write_pairs
    from onpolicy.stack import StackSettings

    if args.run:
        import pyarrow.parquet as pq

        table = pq.read_table(Path(args.run) / "pairs.parquet")
        if args.lineage:
            rows = [r for r in table.to_pylist() if r["lineage"] == args.lineage]
        else:
            rows = table.to_pylist()
    else:
        settings = load_settings(StackSettings, config_file=args.config)
        pairs: dict[str, m.PreferencePair] = {}
        for record in read_topic(
            settings.kafka, settings.topics.name("pairs"), m.PreferencePair, timeout_s=300
        ):
            pairs.setdefault(record.message.id, record.message)  # duplicates by id dropped
        rows = pair_rows(list(pairs.values()))
    if not rows:
        console.print("[red]no pairs to export[/]")
        return 1
    if str(args.out).endswith(".jsonl"):
        import json

        with open(args.out, "w") as fh:
            for row in rows:
                fh.write(json.dumps(row) + "\n")
    else:
        write_pairs(Path(args.out), rows)
    console.print(f"wrote {len(rows)} pairs to {args.out} (TRL prompt/chosen/rejected + metadata)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="onpolicy",
        description="On-policy preference tuning: sample with vLLM, judge, train DPO, repeat.",
        epilog="Settings come from ONPOLICY_* environment variables and an optional YAML file "
        "(--config or ONPOLICY_CONFIG); see the README.",
    )
    parser.add_argument("--config", type=Path, help="YAML settings file")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    up = sub.add_parser(
        "up",
        help="start the local stack (Kafka broker, vLLM server)",
        description="Start a local single-node Kafka broker (KRaft) and a vLLM "
        "server for the default model; fetch and cache what they "
        "need on the first run.",
    )
    up.add_argument("--kafka-only", action="store_true", help="start only the Kafka broker")
    up.set_defaults(func=cmd_up)

    prepare = sub.add_parser(
        "prepare",
        help="fetch and cache what the stack needs, start nothing",
        description="Fetch Kafka's jars, install vLLM in its own virtual "
        "environment and convert the default model, once.",
    )
    prepare.add_argument("--kafka-only", action="store_true", help="only Kafka's jars")
    prepare.set_defaults(func=cmd_prepare)

    down = sub.add_parser("down", help="stop the local stack")
    down.add_argument("--wipe", action="store_true", help="also delete the broker's data")
    down.set_defaults(func=cmd_down)

    status = sub.add_parser("status", help="show what of the local stack is running")
    status.set_defaults(func=cmd_status)

    topics = sub.add_parser("topics", help="create the pipeline's topics on the configured cluster")
    topics.set_defaults(func=cmd_topics)

    for name, helptext in (
        ("run", "run the on-policy loop: sample, judge, DPO, repeat"),
        ("demo", "the loop on the embedded default (what `make demo` runs)"),
    ):
        run = sub.add_parser(
            name,
            help=helptext,
            description=helptext + ". Starts the local "
            "stack and the three services, runs the rounds and writes "
            "runs/<id>/ (report.json, report.png, pairs.parquet, adapters).",
        )
        from onpolicy.run.settings import DEMO_TASK, RunSettings

        for flag, kind in RUN_FLAGS.items():
            field = RunSettings.model_fields[flag]
            default = (
                ""
                if field.default_factory or field.default is None
                else (f" (default {field.default})")
            )
            if name == "demo" and flag == "task":
                default = f" (default {DEMO_TASK})"
            choices = (
                get_args(field.annotation) if get_origin(field.annotation) is Literal else None
            )
            run.add_argument(
                "--" + flag.replace("_", "-"),
                type=kind,
                dest=flag,
                choices=choices,
                help=f"{field.description or flag}{default}",
            )
        judges = run.add_argument_group(
            "judge (one of these; default: the task's own)",
            "The judge can also be set in the YAML file (run.judge, the judge service's "
            "settings); these flags go over it.",
        ).add_mutually_exclusive_group()
        judges.add_argument(
            "--judge",
            metavar="SPEC",
            help="function judge: a built-in (instructions: the prompts' checkable "
            "constraints, pass/fail; concise: short answers that end, form not content; "
            "length, repetition, finished, exact_match, regex) or module:function; "
            "several comma separated are averaged",
        )
        judges.add_argument(
            "--judge-url",
            metavar="URL",
            help="LLM judge: an OpenAI-compatible base URL (e.g. https://api.openai.com/v1)",
        )
        judges.add_argument(
            "--reward-model",
            type=Path,
            metavar="DIR",
            help="reward model: a sequence-classification model folder",
        )
        run.add_argument("--judge-model", metavar="NAME", help="with --judge-url: the model name")
        run.add_argument(
            "--judge-token-env",
            metavar="VAR",
            help="with --judge-url: the environment variable holding the API token "
            "(default OPENAI_API_KEY)",
        )
        run.add_argument(
            "--compare-offpolicy",
            action="store_true",
            help="also train as many pairs sampled only by the initial policy",
        )
        run.add_argument(
            "--external-stack",
            action="store_true",
            help="use the Kafka and vLLM already configured, start neither",
        )
        run.set_defaults(func=cmd_run)

    publish = sub.add_parser("publish", help="validate and send prompts to the prompts topic")
    publish.add_argument("file", type=Path, help="JSONL, Parquet or a local dataset folder")
    publish.add_argument(
        "--heldout",
        action="store_true",
        help="publish to the heldout topic: evaluation prompts that every policy version "
        "samples and that are never trained on",
    )
    publish.set_defaults(func=cmd_publish)

    export = sub.add_parser("export", help="write the preference pairs as a TRL-ready dataset")
    export.add_argument("--run", type=Path, help="a run folder (default: read the pairs topic)")
    export.add_argument("--lineage", help="with --run: onpolicy or offpolicy")
    export.add_argument("--out", type=Path, required=True, help="a .parquet or .jsonl file")
    export.set_defaults(func=cmd_export)
    return parser


def main(argv: list[str] | None = None) -> int:
    from onpolicy.stack.process import StackError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as exc:
        # Plain text: the message holds "[env ...]", which rich would take for markup.
        print(exc, file=sys.stderr)
        return 2
    except StackError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        console.print("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
