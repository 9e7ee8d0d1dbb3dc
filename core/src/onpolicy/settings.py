"""One settings system for every service: pydantic-settings.

Sources, highest priority first: keyword arguments, the service's environment variables
(``ONPOLICY_<SERVICE>_...``), the shared ones (``ONPOLICY_...``, e.g.
``ONPOLICY_KAFKA__BOOTSTRAP_SERVERS`` for every service at once), then an optional YAML file
(``ONPOLICY_CONFIG`` or ``--config``) whose top-level ``kafka``, ``topics``, ``log`` apply to
all services and whose ``<service>:`` section to that service alone. Nested fields use ``__``.
"""

from __future__ import annotations

import os
from contextvars import ContextVar
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar

import yaml
from pydantic import BaseModel, Field, SecretStr, ValidationError
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    InitSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

SHARED_SECTIONS = ("kafka", "topics", "log")
# `heldout`: the evaluation prompts (never trained), sampled again by every policy version;
# `evals`: one EvalResult per version.
TOPIC_KINDS = (
    "prompts",
    "completions",
    "scored",
    "pairs",
    "policy",
    "rounds",
    "heldout",
    "evals",
    "dlq",
)
TopicKind = Literal[
    "prompts", "completions", "scored", "pairs", "policy", "rounds", "heldout", "evals", "dlq"
]

_config_file: ContextVar[Path | None] = ContextVar("onpolicy_config_file", default=None)


class ConfigError(Exception):
    """Invalid settings; the message names every offending field and its variable."""


class KafkaSettings(BaseModel):
    """Connection to the Kafka cluster; security settings pass through to kafka-python."""

    bootstrap_servers: str = Field("127.0.0.1:9092", description="host:port[,host:port...]")
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = None
    sasl_username: str | None = None
    sasl_password: SecretStr | None = None
    ssl_cafile: Path | None = Field(None, description="CA bundle to verify the brokers")
    ssl_certfile: Path | None = None
    ssl_keyfile: Path | None = None
    compression: Literal["gzip", "zstd", "lz4", "none"] = "zstd"
    max_request_size: int = Field(8 * 1024 * 1024, gt=0, description="largest record, bytes")
    linger_ms: int = Field(5, ge=0)
    request_timeout_ms: int = Field(30_000, gt=0)
    max_poll_interval_ms: int = Field(300_000, gt=0)
    session_timeout_ms: int = Field(45_000, gt=0)
    heartbeat_interval_ms: int = Field(3_000, gt=0)

    def client_config(self) -> dict[str, Any]:
        """Keyword arguments shared by kafka-python's producer, consumer and admin client."""
        cfg: dict[str, Any] = {
            "bootstrap_servers": self.bootstrap_servers.split(","),
            "security_protocol": self.security_protocol,
            "request_timeout_ms": self.request_timeout_ms,
        }
        if self.sasl_mechanism:
            cfg["sasl_mechanism"] = self.sasl_mechanism
            cfg["sasl_plain_username"] = self.sasl_username
            cfg["sasl_plain_password"] = (
                self.sasl_password.get_secret_value() if self.sasl_password else None
            )
        for name in ("ssl_cafile", "ssl_certfile", "ssl_keyfile"):
            value = getattr(self, name)
            if value is not None:
                cfg[name] = str(value)
        if self.security_protocol in ("SSL", "SASL_SSL"):
            cfg["ssl_check_hostname"] = True
        return cfg


class TopicSettings(BaseModel):
    """Topic names and how topics are created on start."""

    prefix: str = Field("onpolicy.", description="prepended to every topic name")
    partitions: int = Field(3, ge=1)
    replication_factor: int = Field(1, ge=1)
    retention_ms: int = Field(7 * 24 * 3600 * 1000, ge=-1, description="-1 keeps forever")
    create: bool = Field(True, description="create missing topics on start")

    def name(self, kind: TopicKind) -> str:
        return f"{self.prefix}{kind}"


class LogSettings(BaseModel):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    json_format: bool = Field(False, alias="json", description="one JSON object per line")

    model_config = {"populate_by_name": True}


class HttpSettings(BaseModel):
    """The service's HTTP server: /metrics, /healthz, /readyz and any control routes."""

    host: str = "0.0.0.0"
    port: int = Field(8000, ge=0, le=65535, description="0 picks a free port")


class _YamlSource(InitSettingsSource):
    def __init__(self, settings_cls: type[BaseSettings], path: Path, section: str):
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"cannot read config file {path}: {exc}") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path} must hold a mapping")
        merged = {k: data[k] for k in SHARED_SECTIONS if k in data}
        merged.update(data.get(section) or {})
        super().__init__(settings_cls, init_kwargs=merged)


class ServiceSettings(BaseSettings):
    """Base of each service's settings; subclasses set ``service`` and their own fields."""

    service: ClassVar[str] = "core"

    kafka: KafkaSettings = Field(default_factory=KafkaSettings)
    topics: TopicSettings = Field(default_factory=TopicSettings)
    log: LogSettings = Field(default_factory=LogSettings)
    http: HttpSettings = Field(default_factory=HttpSettings)

    model_config = SettingsConfigDict(env_nested_delimiter="__", extra="forbid")

    @classmethod
    def env_prefix(cls) -> str:
        return f"ONPOLICY_{cls.service.upper()}_"

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [
            init_settings,
            EnvSettingsSource(settings_cls, env_prefix=cls.env_prefix(), env_nested_delimiter="__"),
            EnvSettingsSource(settings_cls, env_prefix="ONPOLICY_", env_nested_delimiter="__"),
        ]
        path = _config_file.get() or (
            Path(os.environ["ONPOLICY_CONFIG"]) if os.environ.get("ONPOLICY_CONFIG") else None
        )
        if path is not None:
            sources.append(_YamlSource(settings_cls, path, cls.service))
        sources.append(file_secret_settings)
        return tuple(sources)


S = TypeVar("S", bound=ServiceSettings)


def load_settings(cls: type[S], config_file: Path | str | None = None, **overrides: Any) -> S:
    """Build ``cls`` from all sources; raise :class:`ConfigError` naming each bad field."""
    token = _config_file.set(Path(config_file) if config_file else None)
    try:
        return cls(**overrides)
    except ValidationError as exc:
        raise ConfigError(describe_errors(cls, exc)) from None
    finally:
        _config_file.reset(token)


def describe_errors(cls: type[ServiceSettings], exc: ValidationError) -> str:
    lines = [f"invalid {cls.service} settings:"]
    for err in exc.errors():
        loc = [str(part) for part in err["loc"]]
        field = ".".join(loc) or "(root)"
        env = cls.env_prefix() + "__".join(loc).upper()
        if loc and loc[0] in SHARED_SECTIONS:
            env += " or ONPOLICY_" + "__".join(loc).upper()
        value = err.get("input")
        shown = "" if isinstance(value, dict) or value is None else f" (got {value!r})"
        lines.append(f"  {field}: {err['msg']}{shown} [env {env}]")
    return "\n".join(lines)
