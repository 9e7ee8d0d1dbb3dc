"""Who may do what on the pipeline's Kafka: one principal per service, and a prompt publisher.

The one table both the local stack's secured broker (``kafka_security``) and the Strimzi
``KafkaUser`` manifests (deploy/k8s/overlays/gpu) are checked against. Each service reads and
writes only the topics its code touches, and joins only its own consumer group; the publisher
may only write prompts. Read and Write imply Describe (Kafka's rule), which is all a consumer
that assigns partitions itself (the policy, rounds and planner readers) and an idempotent
producer (Write on any topic grants IdempotentWrite, KIP-679) need besides.
"""

from __future__ import annotations

from dataclasses import dataclass

from onpolicy.settings import TopicKind, TopicSettings

# Topics per principal, from the services' code (topics.name(...) in each).
ACCESS: dict[str, dict[str, tuple[TopicKind, ...]]] = {
    # Prompts in (group sampler); the held-out prompts with every version it serves (groups
    # sampler.heldout.v<N>); follows the policy and the round plans; completions out;
    # prompts and policy updates it cannot use go to the dead-letter topic.
    "sampler": {
        "read": ("prompts", "heldout", "policy", "rounds"),
        "write": ("completions", "dlq"),
    },
    # Completions in (group judge); scored groups and pairs out.
    "judge": {"read": ("completions",), "write": ("scored", "pairs", "dlq")},
    # Pairs in (group trainer); the planner follows prompts, scored groups, dead letters and
    # its own plans; the round runner recovers from and publishes the policy; the evaluator
    # follows the held-out prompts, scored groups and its own results.
    "trainer": {
        "read": ("pairs", "prompts", "scored", "dlq", "rounds", "policy", "heldout", "evals"),
        "write": ("policy", "rounds", "evals", "dlq"),
    },
    # Outside clients that feed the loop: training and held-out prompts only, nothing read.
    "publisher": {"read": (), "write": ("prompts", "heldout")},
}
# The consumer group each service's principal may use (the services' default group_id).
GROUPS: dict[str, str] = {"sampler": "sampler", "judge": "judge", "trainer": "trainer"}
# Consumer groups by prefix: the sampler's held-out groups, one per policy version
# (onpolicy_sampler.evaluation.heldout_group_id).
GROUP_PREFIXES: dict[str, str] = {"sampler": "sampler.heldout."}
SERVICE_PRINCIPALS = ("sampler", "judge", "trainer")
PRINCIPALS = (*SERVICE_PRINCIPALS, "publisher")


@dataclass(frozen=True, order=True)
class Grant:
    """One ALLOW rule: ``principal`` may ``operation`` (Read, Write) on a literal resource."""

    principal: str
    resource: str  # "topic" or "group"
    name: str
    operation: str
    pattern: str = "literal"  # or "prefix": every name starting with ``name``


def acl_plan(topics: TopicSettings, groups: dict[str, str] | None = None) -> list[Grant]:
    """Every grant for ``topics``' names; anything not granted is denied (StandardAuthorizer)."""
    groups = GROUPS if groups is None else groups
    plan: set[Grant] = set()
    for principal, access in ACCESS.items():
        for operation in ("read", "write"):
            for kind in access[operation]:
                plan.add(Grant(principal, "topic", topics.name(kind), operation.title()))
        if principal in groups:
            plan.add(Grant(principal, "group", groups[principal], "Read"))
            if principal in GROUP_PREFIXES:
                prefix = GROUP_PREFIXES[principal].replace(GROUPS[principal], groups[principal], 1)
                plan.add(Grant(principal, "group", prefix, "Read", "prefix"))
    return sorted(plan)
