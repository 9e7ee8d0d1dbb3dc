"""The local broker secured: SASL_SSL with SCRAM-SHA-512, TLS both ways, and ACLs.

``kafka_security=sasl_ssl`` (``ONPOLICY_STACK_KAFKA_SECURITY``) makes the stack's broker what
a production cluster is: clients speak TLS (the broker's certificate is signed by a CA made
here; clients present a certificate of that CA too: ``ssl.client.auth=required``), log in
with SCRAM-SHA-512 (one user per service, a prompt publisher and an admin, created when the
log directory is formatted), and the ``StandardAuthorizer`` denies whatever the ACL table
(:mod:`onpolicy.stack.kafka_acls`) does not grant. The admin is the only super user: the
stack creates the topics and the ACLs with it.

Everything lives under ``state/kafka-security``, readable by its owner only: the CA and the
certificates (made with the ``openssl`` command), and ``credentials.json``, the passwords.
The controller listener (loopback, broker to controller) uses SASL PLAIN with the admin's
password: KRaft controllers cannot check SCRAM, whose credentials live in the metadata log
they serve.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
from pathlib import Path
from typing import Any

from pydantic import SecretStr

from onpolicy.secrets import write_private
from onpolicy.settings import KafkaSettings, TopicSettings
from onpolicy.stack.kafka_acls import PRINCIPALS, acl_plan
from onpolicy.stack.process import StackError

ADMIN = "admin"
MECHANISM = "SCRAM-SHA-512"
_DAYS = "825"


def _jaas(module: str, user: str, password: str, extra: str = "") -> str:
    return (
        f"org.apache.kafka.common.security.{module} required "
        f'username="{user}" password="{password}"{extra};'
    )


class KafkaSecurity:
    """Certificates, users and ACLs of one local broker (its ``state/kafka-security``)."""

    def __init__(self, state: Path):
        self.dir = state / "kafka-security"

    @property
    def ca(self) -> Path:
        return self.dir / "ca.pem"

    @property
    def client_cert(self) -> Path:
        return self.dir / "client.pem"

    @property
    def client_key(self) -> Path:
        return self.dir / "client.key"

    def ensure(self) -> None:
        """Make the CA, the certificates and the passwords once (kept across restarts)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.dir, 0o700)
        if not (self.dir / "credentials.json").exists():
            passwords = {p: secrets.token_urlsafe(24) for p in (ADMIN, *PRINCIPALS)}
            write_private(self.dir / "credentials.json", json.dumps(passwords, indent=2))
        if not (self.dir / "broker-keystore.pem").exists():
            self._certificates()

    def password(self, principal: str) -> str:
        passwords = json.loads((self.dir / "credentials.json").read_text())
        if principal not in passwords:
            raise StackError(f"no Kafka user {principal!r}; the users are {sorted(passwords)}")
        return passwords[principal]

    def _openssl(self, *args: str) -> None:
        openssl = shutil.which("openssl")
        if openssl is None:
            raise StackError(
                "kafka_security=sasl_ssl makes its certificates with openssl "
                "(apt-get install openssl)"
            )
        done = subprocess.run([openssl, *args], cwd=self.dir, capture_output=True, text=True)
        if done.returncode != 0:
            raise StackError(f"openssl {args[0]} failed: {done.stderr.strip()[-500:]}")

    def _certificates(self) -> None:
        # EC P-256 keys: quick to make; openssl 3 writes them as PKCS#8, which Kafka's PEM
        # key store reads unencrypted (the folder is the owner's alone).
        key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]
        self._openssl(
            "req", "-x509", *key, "-keyout", "ca.key", "-out", "ca.pem", "-days", _DAYS,
            "-subj", "/CN=onpolicy local Kafka CA",
            "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        )  # fmt: skip
        # The broker's certificate names the address clients check (ssl_check_hostname); it
        # also serves as the broker's own client certificate (inter-broker and controller).
        for name, cn, san in (
            ("broker", "localhost", "subjectAltName=IP:127.0.0.1,DNS:localhost\n"),
            ("client", "onpolicy-client", ""),
        ):
            self._openssl(
                "req", *key, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={cn}"
            )  # fmt: skip
            ext = self.dir / f"{name}.ext"
            ext.write_text(san + "extendedKeyUsage=serverAuth,clientAuth\n")
            self._openssl(
                "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                "-CAcreateserial", "-out", f"{name}.pem", "-days", _DAYS, "-extfile", ext.name,
            )  # fmt: skip
            ext.unlink()
            (self.dir / f"{name}.csr").unlink()
        for path in self.dir.glob("*.key"):
            path.chmod(0o600)
        # Kafka's PEM key store: the private key, then the certificate chain, in one file.
        keystore = "".join(
            (self.dir / f).read_text() for f in ("broker.key", "broker.pem", "ca.pem")
        )
        write_private(self.dir / "broker-keystore.pem", keystore)

    def format_args(self) -> list[str]:
        """``kafka-storage format`` arguments that create every SCRAM user."""
        args = []
        for user in (ADMIN, *PRINCIPALS):
            args += ["--add-scram", f"{MECHANISM}=[name={user},password={self.password(user)}]"]
        return args

    def broker_props(self, port: int, controller_port: int) -> dict[str, str]:
        admin = self.password(ADMIN)
        return {
            "listeners": f"SASL_SSL://127.0.0.1:{port},CONTROLLER://127.0.0.1:{controller_port}",
            "advertised.listeners": f"SASL_SSL://127.0.0.1:{port}",
            "listener.security.protocol.map": "SASL_SSL:SASL_SSL,CONTROLLER:SASL_PLAINTEXT",
            "inter.broker.listener.name": "SASL_SSL",
            "sasl.enabled.mechanisms": MECHANISM,
            "sasl.mechanism.inter.broker.protocol": MECHANISM,
            f"listener.name.sasl_ssl.{MECHANISM.lower()}.sasl.jaas.config": _jaas(
                "scram.ScramLoginModule", ADMIN, admin
            ),
            "sasl.mechanism.controller.protocol": "PLAIN",
            "listener.name.controller.sasl.enabled.mechanisms": "PLAIN",
            "listener.name.controller.plain.sasl.jaas.config": _jaas(
                "plain.PlainLoginModule", ADMIN, admin, f' user_{ADMIN}="{admin}"'
            ),
            "ssl.keystore.type": "PEM",
            "ssl.keystore.location": str(self.dir / "broker-keystore.pem"),
            "ssl.truststore.type": "PEM",
            "ssl.truststore.location": str(self.ca),
            # Listener-prefixed: the broker-wide ssl.client.auth applies to SSL listeners only.
            "listener.name.sasl_ssl.ssl.client.auth": "required",
            "authorizer.class.name": "org.apache.kafka.metadata.authorizer.StandardAuthorizer",
            "super.users": f"User:{ADMIN}",
            "allow.everyone.if.no.acl.found": "false",
        }

    def client(self, kafka: KafkaSettings, principal: str) -> KafkaSettings:
        """``kafka`` (a bootstrap address already set) as ``principal`` logs in."""
        return kafka.model_copy(  # model_copy does not validate: the values' own types
            update={
                "security_protocol": "SASL_SSL",
                "sasl_mechanism": MECHANISM,
                "sasl_username": principal,
                "sasl_password": SecretStr(self.password(principal)),
                "ssl_cafile": self.ca,
                "ssl_certfile": self.client_cert,
                "ssl_keyfile": self.client_key,
            }
        )

    def login_env(self, principal: str, service: str) -> dict[str, str]:
        """The variables that log ``service`` (its ``ONPOLICY_<SERVICE>_`` settings) in as
        ``principal``."""
        prefix = f"ONPOLICY_{service.upper()}_KAFKA__"
        return {
            f"{prefix}SASL_USERNAME": principal,
            f"{prefix}SASL_PASSWORD": self.password(principal),
        }

    def shared_env(self) -> dict[str, str]:
        return {
            "ONPOLICY_KAFKA__SECURITY_PROTOCOL": "SASL_SSL",
            "ONPOLICY_KAFKA__SASL_MECHANISM": MECHANISM,
            "ONPOLICY_KAFKA__SSL_CAFILE": str(self.ca),
            "ONPOLICY_KAFKA__SSL_CERTFILE": str(self.client_cert),
            "ONPOLICY_KAFKA__SSL_KEYFILE": str(self.client_key),
            # Only the admin may create topics: the stack has made them.
            "ONPOLICY_TOPICS__CREATE": "false",
        }

    def apply_acls(self, admin_kafka: KafkaSettings, topics: TopicSettings) -> int:
        """Grant :func:`acl_plan` for ``topics`` (creating a rule that exists is a no-op)."""
        from kafka.admin import (
            ACL,
            ACLOperation,
            ACLPermissionType,
            ACLResourcePatternType,
            KafkaAdminClient,
            ResourcePattern,
            ResourceType,
        )

        acls = [
            ACL(
                principal=f"User:{g.principal}",
                host="*",
                operation=ACLOperation[g.operation.upper()],
                permission_type=ACLPermissionType.ALLOW,
                resource_pattern=ResourcePattern(
                    ResourceType[g.resource.upper()],
                    g.name,
                    ACLResourcePatternType.PREFIXED
                    if g.pattern == "prefix"
                    else ACLResourcePatternType.LITERAL,
                ),
            )
            for g in acl_plan(topics)
        ]
        admin = KafkaAdminClient(**admin_kafka.client_config(), client_id="onpolicy-stack")
        try:
            result: dict[str, Any] = admin.create_acls(acls)
        finally:
            admin.close()
        if result.get("failed"):
            raise StackError(f"creating Kafka ACLs failed: {result['failed']}")
        return len(acls)
