"""Kafka on the GPU overlays lets no one in where they don't belong: every listener
authenticates, the simple authorizer is on, and each KafkaUser's ACLs are exactly the local
stack's table (onpolicy.stack.kafka_acls, which tests/integration/test_security.py runs against
a real broker); each service logs in as its own user, KEDA as the judge."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from _deploy import built, dc, load_service_settings, tools_or_fail
from test_deploy_k8s import (
    GPU_OVERLAYS,
    SERVICES,
    config_map_named,
    container,
    env_of,
    named,
    of_kind,
    pod_spec,
    shared_config,
)

from onpolicy.settings import TopicSettings
from onpolicy.stack.kafka_acls import GROUPS, Grant, acl_plan

# The local stack's principals by their KafkaUser names (the publisher predates the table).
USER_OF = {
    "sampler": "sampler",
    "judge": "judge",
    "trainer": "trainer",
    "publisher": "prompt-publisher",
}


@pytest.fixture(scope="module", autouse=True)
def _tools() -> None:
    tools_or_fail()


def grants(user: dict) -> set[Grant]:
    principal = {v: k for k, v in USER_OF.items()}[user["metadata"]["name"]]
    out = set()
    for acl in user["spec"]["authorization"]["acls"]:
        assert acl.get("type", "allow") == "allow" and acl.get("host", "*") == "*"
        resource = acl["resource"]
        pattern = resource.get("patternType", "literal")
        assert pattern in ("literal", "prefix")
        for operation in acl["operations"]:
            out.add(Grant(principal, resource["type"], resource["name"], operation, pattern))
    return out


@pytest.mark.parametrize("overlay", GPU_OVERLAYS)
def test_kafka_users_have_the_local_stacks_acls_and_every_listener_authenticates(
    overlay: str,
) -> None:
    objects = built(overlay)
    kafka = of_kind(objects, "Kafka")[0]
    assert kafka["spec"]["kafka"]["authorization"]["type"] == "simple"
    for listener in kafka["spec"]["kafka"]["listeners"]:
        assert listener["tls"] is True, listener["name"]
        assert listener["authentication"]["type"] == "scram-sha-512", listener["name"]
    users = {u["metadata"]["name"]: u for u in of_kind(objects, "KafkaUser")}
    assert set(users) == set(USER_OF.values())
    for user in users.values():
        assert user["metadata"]["labels"]["strimzi.io/cluster"] == kafka["metadata"]["name"]
        assert user["spec"]["authentication"]["type"] == "scram-sha-512"
        assert user["spec"]["authorization"]["type"] == "simple"
    prefix = shared_config(objects)["topics"]["prefix"]
    expected = set(acl_plan(TopicSettings(prefix=prefix), GROUPS))
    assert set().union(*(grants(u) for u in users.values())) == expected
    # The publisher in particular: training and held-out prompts, written, and nothing more.
    assert grants(users["prompt-publisher"]) == {
        Grant("publisher", "topic", f"{prefix}prompts", "Write"),
        Grant("publisher", "topic", f"{prefix}heldout", "Write"),
    }


@pytest.mark.parametrize("overlay", GPU_OVERLAYS)
def test_each_service_logs_in_as_its_own_user_over_tls(
    overlay: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    objects = built(overlay)
    kafka = of_kind(objects, "Kafka")[0]
    (inside,) = [lst for lst in kafka["spec"]["kafka"]["listeners"] if lst["type"] == "internal"]
    config = tmp_path / "config.yaml"
    config.write_text(config_map_named(objects, "onpolicy-config-")["data"]["config.yaml"])
    ca_secret = f"{kafka['metadata']['name']}-cluster-ca-cert"  # Strimzi's name for it
    for service in SERVICES:
        c = container(objects, service, service)
        settings = load_service_settings(service, env_of(objects, c), config, monkeypatch)
        k = settings.kafka
        assert k.bootstrap_servers.endswith(f":{inside['port']}")
        assert (k.security_protocol, k.sasl_mechanism) == ("SASL_SSL", "SCRAM-SHA-512")
        assert k.sasl_username == service
        (password,) = [v for v in c["env"] if v["name"].endswith("_KAFKA__SASL_PASSWORD")]
        assert password["name"] == f"ONPOLICY_{service.upper()}_KAFKA__SASL_PASSWORD"
        # The Secret Strimzi writes for the KafkaUser of that name.
        assert password["valueFrom"]["secretKeyRef"] == {"name": service, "key": "password"}
        named(objects, "KafkaUser", service)
        # The CA file is the cluster CA Secret's ca.crt, mounted read-only.
        mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
        mount = mounts[str(k.ssl_cafile.parent)]
        assert mount["readOnly"] is True
        volume = next(
            v for v in pod_spec(objects, service)["volumes"] if v["name"] == mount["name"]
        )
        assert volume["secret"]["secretName"] == ca_secret
        assert {i["key"]: i["path"] for i in volume["secret"]["items"]} == {
            "ca.crt": k.ssl_cafile.name
        }
    # KEDA reads the judge's lag as the judge: its variables, on the judge container.
    auth = of_kind(objects, "TriggerAuthentication")[0]["spec"]
    judge_env = {v["name"] for v in container(objects, "judge", "judge")["env"]}
    assert {e["name"] for e in auth["env"]} <= judge_env
    assert {e["containerName"] for e in auth["env"]} == {"judge"}
    assert auth["secretTargetRef"] == [{"parameter": "ca", "name": ca_secret, "key": "ca.crt"}]


@pytest.mark.parametrize("overlay", ["base", "dev"])
def test_the_cpu_overlays_keep_the_plain_in_cluster_listener(overlay: str) -> None:
    objects = built(overlay)
    kafka = of_kind(objects, "Kafka")[0]["spec"]["kafka"]
    assert "authorization" not in kafka and of_kind(objects, "KafkaUser") == []


def test_kafka_user_schema_catches_a_mistyped_acl() -> None:
    user = json.loads(json.dumps(named(built("gpu"), "KafkaUser", "sampler")))
    assert dc.validate_object(user) == []
    user["spec"]["authorization"]["acls"][0]["operations"] = ["Reed"]
    assert any("Reed" in e for e in dc.validate_object(user))
    user["spec"]["authorizaton"] = user["spec"].pop("authorization")
    assert any("authorizaton" in e for e in dc.validate_object(user))
