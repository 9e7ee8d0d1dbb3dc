"""The common entry point of every service: settings, logging, HTTP server, topics, run.

A service provides its settings class and a ``build`` function returning its
:class:`~onpolicy.bus.Processor`; ``service_main`` does the rest the same way everywhere, so
each service's ``__main__`` is three lines.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel

from onpolicy.bus import Processor, ensure_topics
from onpolicy.settings import ConfigError, ServiceSettings, load_settings
from onpolicy.telemetry import Metrics, ServiceServer, setup_logging

log = logging.getLogger(__name__)

S = TypeVar("S", bound=ServiceSettings)
Build = Callable[[S, Metrics, ServiceServer], Processor[Any]]


def _fields(model: type[BaseModel], prefix: tuple[str, ...] = ()) -> Iterator[tuple[str, str, str]]:
    for name, info in model.model_fields.items():
        annotation = info.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            yield from _fields(annotation, (*prefix, name))
            continue
        default = "" if info.default_factory is not None else repr(info.default)
        yield ".".join((*prefix, name)), default, info.description or ""


def settings_help(settings_cls: type[ServiceSettings]) -> str:
    """A table of every setting with its environment variable, for ``--help``."""
    lines = ["settings (environment variable, default):"]
    for dotted, default, doc in _fields(settings_cls):
        env = settings_cls.env_prefix() + dotted.replace(".", "__").upper()
        lines.append(f"  {env}={default}" + (f"  # {doc}" if doc else ""))
    lines.append("shared sections (kafka, topics, log) also read ONPOLICY_<SECTION>__<FIELD>.")
    return "\n".join(lines)


def parse_settings(settings_cls: type[S], argv: list[str] | None = None) -> S:
    parser = argparse.ArgumentParser(
        prog=f"onpolicy-{settings_cls.service}",
        description=(settings_cls.__doc__ or "").strip(),
        epilog=settings_help(settings_cls),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", type=Path, help="YAML settings file (or ONPOLICY_CONFIG)")
    args = parser.parse_args(argv)
    return load_settings(settings_cls, config_file=args.config)


def service_main(settings_cls: type[S], build: Build[S], argv: list[str] | None = None) -> int:
    """Run a service until SIGTERM/Ctrl-C; exit 2 with the field named on bad settings."""
    try:
        settings = parse_settings(settings_cls, argv)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    service = settings_cls.service
    setup_logging(settings.log, service)
    metrics = Metrics(service)
    server = ServiceServer(service, metrics, settings.http)
    if settings.topics.create:
        ensure_topics(settings.kafka, settings.topics)
    processor = build(settings, metrics, server)
    server.add_check("kafka", lambda: processor.kafka_connected)
    server.start()
    try:
        processor.run()
    finally:
        server.stop()
    return 0
