"""The secured local broker's files and settings, without a broker: certificates that verify
against the CA made for them, secrets readable by their owner only, no listener left without
TLS and a login, and the ACL table (the broker itself: tests/integration/test_security.py)."""

from __future__ import annotations

import ssl
import subprocess

import pytest

from onpolicy.settings import KafkaSettings, TopicSettings
from onpolicy.stack.kafka_acls import Grant, acl_plan
from onpolicy.stack.kafka_security import KafkaSecurity


@pytest.fixture(scope="module")
def security(tmp_path_factory: pytest.TempPathFactory) -> KafkaSecurity:
    security = KafkaSecurity(tmp_path_factory.mktemp("state"))
    security.ensure()
    return security


def test_certificates_chain_to_the_ca_and_name_the_loopback_address(security) -> None:
    for cert in ("broker.pem", "client.pem"):
        done = subprocess.run(
            ["openssl", "verify", "-CAfile", "ca.pem", cert],
            cwd=security.dir,
            capture_output=True,
            text=True,
        )
        assert done.returncode == 0, done.stderr
    text = subprocess.run(
        ["openssl", "x509", "-in", "broker.pem", "-noout", "-ext", "subjectAltName"],
        cwd=security.dir,
        capture_output=True,
        text=True,
    ).stdout
    assert "IP Address:127.0.0.1" in text
    # What kafka-python does with the settings: a client context that loads them.
    context = ssl.create_default_context(cafile=str(security.ca))
    context.load_cert_chain(str(security.client_cert), str(security.client_key))


def test_secrets_are_the_owners_alone_and_kept_across_restarts(security) -> None:
    for name in ("credentials.json", "broker-keystore.pem", "ca.key", "broker.key", "client.key"):
        assert (security.dir / name).stat().st_mode & 0o077 == 0, name
    assert security.dir.stat().st_mode & 0o077 == 0
    before = security.password("trainer")
    security.ensure()  # a restart: the same users, the same CA
    assert security.password("trainer") == before
    assert len({security.password(p) for p in ("admin", "sampler", "judge", "trainer")}) == 4


def test_every_listener_needs_a_login_and_only_acls_grant_access(security) -> None:
    props = security.broker_props(9092, 9093)
    protocols = dict(p.split(":") for p in props["listener.security.protocol.map"].split(","))
    listeners = [x.split("://")[0] for x in props["listeners"].split(",")]
    assert {protocols[name] for name in listeners} == {"SASL_SSL", "SASL_PLAINTEXT"}
    assert protocols["CONTROLLER"] == "SASL_PLAINTEXT"  # loopback, broker to controller
    assert props["listener.name.sasl_ssl.ssl.client.auth"] == "required"
    assert props["authorizer.class.name"].endswith("StandardAuthorizer")
    assert props["super.users"] == "User:admin"
    assert props["allow.everyone.if.no.acl.found"] == "false"
    args = security.format_args()
    assert sum(a == "--add-scram" for a in args) == 5  # admin, 3 services, the publisher


def test_a_client_logs_in_as_its_principal(security) -> None:
    kafka = security.client(KafkaSettings(bootstrap_servers="127.0.0.1:1"), "judge")
    cfg = kafka.client_config()
    assert cfg["security_protocol"] == "SASL_SSL" and cfg["sasl_mechanism"] == "SCRAM-SHA-512"
    assert cfg["sasl_plain_username"] == "judge"
    assert cfg["sasl_plain_password"] == security.password("judge")
    assert cfg["ssl_check_hostname"] is True
    assert "judge" not in repr(kafka.sasl_password) and security.password("judge") not in repr(
        kafka
    )


def test_the_acl_table_keeps_the_publisher_to_prompts() -> None:
    plan = acl_plan(TopicSettings(prefix="x."))
    assert [g for g in plan if g.principal == "publisher"] == [
        Grant("publisher", "topic", "x.heldout", "Write"),
        Grant("publisher", "topic", "x.prompts", "Write"),
    ]
    writers = {g.name: set() for g in plan}
    for g in plan:
        if g.operation == "Write":
            writers[g.name].add(g.principal)
    assert writers["x.policy"] == {"trainer"} and writers["x.pairs"] == {"judge"}
    assert writers["x.completions"] == {"sampler"} and writers["x.scored"] == {"judge"}
    assert writers["x.evals"] == {"trainer"}
    groups = {(g.principal, g.name, g.pattern) for g in plan if g.resource == "group"}
    assert groups == {
        ("sampler", "sampler", "literal"),
        ("sampler", "sampler.heldout.", "prefix"),  # one held-out group per policy version
        ("judge", "judge", "literal"),
        ("trainer", "trainer", "literal"),
    }
