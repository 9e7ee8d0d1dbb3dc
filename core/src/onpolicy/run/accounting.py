"""Where every published prompt ended: the audit behind "no prompt lost".

Read from Kafka and the trainer's saved datasets alone (what a deployment keeps), so the same
audit serves tests, benchmarks and an operator. A training prompt ends in one of four ways:

- ``trained``: a pair made from its samples is in a saved round's dataset;
- ``dropped``: with a recorded reason: dead-lettered (the prompt, or its group by the
  judge), or judged and every candidate pair dropped by the pair rules (ties, none finished);
- ``waiting``: not sampled yet, or planned for a round still open (still in Kafka);
- ``lost``: anything else, e.g. sampled for a round that trained without it.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from google.protobuf.message import DecodeError

from onpolicy import messages as m
from onpolicy.bus import read_topic
from onpolicy.rounds import RoundBook
from onpolicy.settings import KafkaSettings, TopicSettings


@dataclass
class Audit:
    published_prompts: int = 0
    sampled_groups: int = 0  # training groups sampled (distinct ids)
    trained_pairs: int = 0
    fates: Counter[str] = field(default_factory=Counter)
    lost: list[tuple[int, int]] = field(default_factory=list)  # (partition, offset)
    # Groups sampled by another policy than the round that took their prompt names.
    off_plan_groups: int = 0
    rounds_trained: list[int] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "published_prompts": self.published_prompts,
            "sampled_groups": self.sampled_groups,
            "trained_pairs": self.trained_pairs,
            "lost_prompts": len(self.lost),
            "fates": dict(self.fates),
            "off_plan_groups": self.off_plan_groups,
            "rounds_trained": self.rounds_trained,
        }


def trained_rows(checkpoints: Path) -> dict[int, list[dict[str, Any]]]:
    """Each saved round's dataset rows, by the version it produced."""
    import pyarrow.parquet as pq

    return {
        int(f.stem.removeprefix("round-")): pq.read_table(f).to_pylist()
        for f in sorted((checkpoints / "datasets").glob("round-*.parquet"))
    }


def audit(kafka: KafkaSettings, topics: TopicSettings, checkpoints: Path) -> Audit:
    plans = RoundBook()  # the newest plan of each round, as the samplers see them
    for r in read_topic(kafka, topics.name("rounds"), m.RoundPlan):
        plans.add(r.message)
    rows = trained_rows(checkpoints)
    trained = {row["pair_id"] for rs in rows.values() for row in rs}
    last_trained = max(rows, default=0)
    groups: dict[tuple[int, int], list[m.CompletionGroup]] = {}
    seen: set[str] = set()
    for r in read_topic(kafka, topics.name("completions"), m.CompletionGroup):
        g = r.message
        if g.prompt.dataset_split == "eval" or g.id in seen:
            continue
        seen.add(g.id)
        groups.setdefault((g.source.partition, g.source.offset), []).append(g)
    pairs_of = {
        r.message.group.id: list(r.message.pair_ids)
        for r in read_topic(kafka, topics.name("scored"), m.ScoredGroup)
    }
    dead = set()
    for d in read_topic(kafka, topics.name("dlq"), m.DeadLetter):
        if d.message.source_topic == topics.name("prompts"):
            dead.add((d.message.partition, d.message.offset))
        elif d.message.source_topic == topics.name("completions"):
            # The judge dead-lettered the prompt's group (e.g. a reference RE2 refuses).
            try:
                source = m.CompletionGroup.FromString(d.message.original_value).source
            except DecodeError:
                continue  # not a group the sampler wrote: it names no prompt
            dead.add((source.partition, source.offset))

    out = Audit(sampled_groups=len(seen), trained_pairs=len(trained))
    out.rounds_trained = sorted(rows)
    for record in read_topic(kafka, topics.name("prompts"), m.Prompt):
        if record.message.dataset_split == "eval":
            continue
        out.published_prompts += 1
        where = (record.partition, record.offset)
        plan = plans.covering(*where)
        sampled = groups.get(where, [])
        if plan is not None:
            out.off_plan_groups += sum(g.policy_version < plan.sample_version for g in sampled)
        made = [pid for g in sampled for pid in pairs_of.get(g.id, [])]
        if any(pid in trained for pid in made):
            fate = "trained"
        elif where in dead:
            fate = "dropped"
        elif sampled and all(g.id in pairs_of and not pairs_of[g.id] for g in sampled):
            fate = "dropped"  # judged; the pair rules kept no pair (counted by reason)
        elif plan is not None and plan.round > last_trained:
            fate = "waiting"  # its round is still open
        elif not sampled and (plan is None or plan.round > last_trained):
            fate = "waiting"  # not taken yet: still in Kafka
        else:
            fate = "lost"
            out.lost.append(where)
        out.fates[fate] += 1
    return out
