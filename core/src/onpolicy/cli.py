"""The ``onpolicy`` command: the local stack, topics and a look at what is running."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from onpolicy.settings import ConfigError, load_settings

console = Console(stderr=True)


def _stack_settings(args: argparse.Namespace):  # -> StackSettings (imported lazily: fast --help)
    from onpolicy.stack import StackSettings

    return load_settings(StackSettings, config_file=args.config)


def cmd_up(args: argparse.Namespace) -> int:
    from onpolicy.bus import ensure_topics
    from onpolicy.stack import KafkaBroker, VllmServer, ensure_default_model

    settings = _stack_settings(args)
    kafka = settings.kafka
    if settings.external_kafka:
        console.print(f"using the Kafka cluster at [bold]{kafka.bootstrap_servers}[/]")
    else:
        broker = KafkaBroker(settings)
        with console.status("starting Apache Kafka (KRaft, single node)..."):
            seconds = broker.start()
        kafka = kafka.model_copy(update={"bootstrap_servers": broker.bootstrap})
        console.print(f"[green]kafka[/] ready at {broker.bootstrap} ({seconds:.1f}s)")
    created = ensure_topics(kafka, settings.topics)
    console.print(
        f"[green]topics[/] {settings.topics.prefix}* ready"
        + (f" (created {len(created)})" if created else "")
    )

    env = {"ONPOLICY_KAFKA__BOOTSTRAP_SERVERS": kafka.bootstrap_servers}
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
        }
    settings.state.mkdir(parents=True, exist_ok=True)
    env_file = settings.state / "stack.env"
    env_file.write_text("".join(f"export {k}={v}\n" for k, v in env.items()))
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
    Console().print(table)
    return 0


def cmd_topics(args: argparse.Namespace) -> int:
    from onpolicy.bus import ensure_topics

    settings = _stack_settings(args)
    created = ensure_topics(settings.kafka, settings.topics)
    console.print(f"created {', '.join(created)}" if created else "all topics exist")
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
    return parser


def main(argv: list[str] | None = None) -> int:
    from onpolicy.stack.process import StackError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as exc:
        console.print(f"[red]{exc}[/]")
        return 2
    except StackError as exc:
        console.print(f"[red]error:[/] {exc}")
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
