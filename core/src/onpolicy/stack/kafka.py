"""A single-node Apache Kafka broker in KRaft mode, run from the release's jars.

The jars come from Maven Central through Maven (Debian ships no broker and the Apache
download mirrors are out of reach here) and are cached under ``home/kafka-<version>/libs``;
``KAFKA_HOME`` points at an unpacked release instead.
"""

from __future__ import annotations

import base64
import shutil
import socket
import uuid
from pathlib import Path

from onpolicy.secrets import write_private
from onpolicy.settings import KafkaSettings
from onpolicy.stack.kafka_security import ADMIN, KafkaSecurity
from onpolicy.stack.process import ManagedProcess, StackError, run_checked
from onpolicy.stack.settings import StackSettings

LOG4J_VERSION = "2.25.3"
SLF4J_VERSION = "2.0.17"

_POM = """<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>onpolicy</groupId><artifactId>kafka-broker</artifactId><version>1</version>
  <packaging>pom</packaging>
  <dependencies>
    <dependency><groupId>org.apache.kafka</groupId><artifactId>kafka_2.13</artifactId>
      <version>{kafka}</version></dependency>
    <dependency><groupId>org.slf4j</groupId><artifactId>slf4j-api</artifactId>
      <version>{slf4j}</version></dependency>
    <dependency><groupId>org.apache.logging.log4j</groupId><artifactId>log4j-slf4j2-impl</artifactId>
      <version>{log4j}</version></dependency>
    <dependency><groupId>org.apache.logging.log4j</groupId><artifactId>log4j-core</artifactId>
      <version>{log4j}</version></dependency>
  </dependencies>
</project>
"""

_LOG4J2 = """Configuration:
  status: warn
  Appenders:
    Console:
      name: STDOUT
      PatternLayout:
        pattern: "[%d] %p %m (%c)%n"
  Loggers:
    Root:
      level: warn
      AppenderRef:
        - ref: STDOUT
    Logger:
      - name: kafka.server.KafkaRaftServer
        level: info
      - name: kafka.server.BrokerServer
        level: info
"""


def ensure_kafka_jars(settings: StackSettings) -> Path:
    """The broker's classpath folder, fetched once with Maven."""
    if settings.kafka_home:
        libs = settings.kafka_home / "libs"
        if not libs.is_dir():
            raise StackError(f"KAFKA_HOME={settings.kafka_home} has no libs/ folder")
        return libs
    root = settings.home / f"kafka-{settings.kafka_version}"
    libs = root / "libs"
    if (root / ".complete").exists():
        return libs
    mvn = shutil.which("mvn")
    if mvn is None:
        raise StackError(
            "the local Kafka broker needs Maven (apt-get install maven) to fetch its jars, "
            "or KAFKA_HOME pointing at an unpacked Kafka release, or "
            "ONPOLICY_STACK_EXTERNAL_KAFKA=true with ONPOLICY_KAFKA__BOOTSTRAP_SERVERS"
        )
    root.mkdir(parents=True, exist_ok=True)
    (root / "pom.xml").write_text(
        _POM.format(kafka=settings.kafka_version, slf4j=SLF4J_VERSION, log4j=LOG4J_VERSION)
    )
    shutil.rmtree(libs, ignore_errors=True)
    run_checked(
        [
            mvn,
            "-q",
            "-B",
            "-f",
            str(root / "pom.xml"),
            "dependency:copy-dependencies",
            f"-DoutputDirectory={libs}",
            "-DincludeScope=runtime",
        ],
        f"fetching Apache Kafka {settings.kafka_version} from Maven Central",
    )
    # kafka_2.13 drags in slf4j 1.7 too; keep only the 2.x API that the log4j binding needs.
    for jar in libs.glob("slf4j-api-1.*.jar"):
        jar.unlink()
    (root / ".complete").touch()
    return libs


# The "small" profile: a broker on a developer's machine or a CI runner serves a handful of
# clients, on cores that the trainer's and vLLM's threads need. Kafka's defaults (3 network
# threads per listener, 8 request handlers, G1, the full JIT) suit a server: idle, that broker
# woke ~280 times a second and took 29-41 ms of CPU a second here (2 cores), much of it C2
# still compiling a minute after start; each wake-up preempts a training or vLLM thread.
# `python -m benchmarks stack` measures both profiles side by side.
_SMALL_PROPS = {
    "num.network.threads": "1",
    "num.io.threads": "2",
    "background.threads": "2",
    "group.coordinator.threads": "1",
    "share.coordinator.threads": "1",
}
_SMALL_JVM = ["-XX:+UseSerialGC", "-XX:TieredStopAtLevel=1"]


def _cluster_id() -> str:
    return base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")


def port_open(host: str, port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


class KafkaBroker:
    """Start, probe and stop the local broker; its data lives in ``state/kafka-data``."""

    def __init__(self, settings: StackSettings):
        self.settings = settings
        self.state = settings.state
        self.process = ManagedProcess("kafka", self.state)
        self.data = self.state / "kafka-data"
        # kafka_security=sasl_ssl: TLS, SCRAM users and ACLs (see kafka_security).
        self.security = KafkaSecurity(self.state) if settings.kafka_security == "sasl_ssl" else None

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.settings.kafka_port}"

    def client(self, principal: str = ADMIN) -> KafkaSettings:
        """The stack's Kafka settings aimed at this broker, logged in as ``principal`` when
        secured (the admin by default; without security, everyone is anonymous)."""
        kafka = self.settings.kafka.model_copy(update={"bootstrap_servers": self.bootstrap})
        if self.security is None:  # the plain broker speaks PLAINTEXT whatever the settings say
            return kafka.model_copy(
                update={
                    "security_protocol": "PLAINTEXT",
                    **dict.fromkeys(("sasl_mechanism", "sasl_username", "sasl_password")),
                    **dict.fromkeys(("ssl_cafile", "ssl_certfile", "ssl_keyfile")),
                }
            )
        return self.security.client(kafka, principal)

    def _write_config(self) -> Path:
        s = self.settings
        props = {
            "process.roles": "broker,controller",
            "node.id": "1",
            "controller.quorum.bootstrap.servers": f"127.0.0.1:{s.kafka_controller_port}",
            "listeners": f"PLAINTEXT://127.0.0.1:{s.kafka_port},"
            f"CONTROLLER://127.0.0.1:{s.kafka_controller_port}",
            "advertised.listeners": f"PLAINTEXT://127.0.0.1:{s.kafka_port}",
            "controller.listener.names": "CONTROLLER",
            "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
            "inter.broker.listener.name": "PLAINTEXT",
            "log.dirs": str(self.data),
            "offsets.topic.replication.factor": "1",
            "offsets.topic.num.partitions": "5",
            "transaction.state.log.replication.factor": "1",
            "transaction.state.log.min.isr": "1",
            "share.coordinator.state.topic.replication.factor": "1",
            "share.coordinator.state.topic.min.isr": "1",
            "group.initial.rebalance.delay.ms": "0",
            "group.min.session.timeout.ms": "1000",
            "auto.create.topics.enable": "false",
            "message.max.bytes": str(s.kafka.max_request_size),
            "num.partitions": "1",
        }
        if s.kafka_profile == "small":
            props |= _SMALL_PROPS
        if self.security is not None:
            props |= self.security.broker_props(s.kafka_port, s.kafka_controller_port)
        path = self.state / "server.properties"
        # Private: when secured, it holds the admin's password.
        write_private(path, "".join(f"{k}={v}\n" for k, v in props.items()))
        (self.state / "log4j2.yaml").write_text(_LOG4J2)
        return path

    def _java(self) -> str:
        java = shutil.which("java")
        if java is None:
            raise StackError(
                "the local Kafka broker needs Java 17+ (apt-get install openjdk-17-jre)"
            )
        return java

    def start(self, timeout: float = 60.0) -> float:
        """Start the broker if needed and wait until it serves requests; return seconds."""
        if self.process.running() and port_open("127.0.0.1", self.settings.kafka_port):
            return 0.0
        if port_open("127.0.0.1", self.settings.kafka_port):
            raise StackError(
                f"port {self.settings.kafka_port} is taken by another process; set "
                "ONPOLICY_STACK_KAFKA_PORT, or ONPOLICY_STACK_EXTERNAL_KAFKA=true to use it"
            )
        libs = ensure_kafka_jars(self.settings)
        java = self._java()
        self.state.mkdir(parents=True, exist_ok=True)
        if self.security is not None:
            self.security.ensure()
        config = self._write_config()
        classpath = f"{libs}/*"
        if not (self.data / "meta.properties").exists():
            self.data.mkdir(parents=True, exist_ok=True)
            run_checked(
                [
                    java,
                    "-cp",
                    classpath,
                    "kafka.tools.StorageTool",
                    "format",
                    "--standalone",
                    # One argument: a random id may start with "-", which argparse would
                    # take for an option.
                    f"--cluster-id={_cluster_id()}",
                    "-c",
                    str(config),
                    *(self.security.format_args() if self.security else []),
                ],
                "formatting the Kafka log directory",
            )
        self.process.start(
            [
                java,
                f"-Xmx{self.settings.kafka_heap}",
                f"-Xms{self.settings.kafka_heap}",
                *(_SMALL_JVM if self.settings.kafka_profile == "small" else ["-XX:+UseG1GC"]),
                "-Djava.awt.headless=true",
                f"-Dlog4j2.configurationFile={self.state / 'log4j2.yaml'}",
                "-cp",
                classpath,
                "kafka.Kafka",
                str(config),
            ],
        )
        seconds = self.process.wait_until(self._serving, timeout, "ready")
        if self.security is not None:
            self.security.apply_acls(self.client(), self.settings.topics)
        return seconds

    def _serving(self) -> bool:
        if not port_open("127.0.0.1", self.settings.kafka_port):
            return False
        from kafka.admin import KafkaAdminClient  # a real request, not only an open port

        try:
            admin = KafkaAdminClient(
                **self.client().model_copy(update={"request_timeout_ms": 3000}).client_config()
            )
        except Exception:
            return False
        try:
            admin.list_topics()
            return True
        except Exception:
            return False
        finally:
            admin.close()

    def stop(self) -> bool:
        return self.process.stop(timeout=30)

    def wipe(self) -> None:
        """Delete the broker's data (only when stopped)."""
        if self.process.running():
            raise StackError("stop the broker before wiping its data")
        shutil.rmtree(self.data, ignore_errors=True)
