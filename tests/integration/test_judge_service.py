"""The judge service through the real Kafka broker."""

from __future__ import annotations

import subprocess
import sys

from _util import committed, running, sample_value, wait_records, wait_until

from onpolicy import messages as m
from onpolicy.bus import Producer, read_topic
from onpolicy.settings import HttpSettings
from onpolicy.telemetry import Metrics, ServiceServer
from onpolicy_judge.service import build
from onpolicy_judge.settings import JudgeSettings

CONCISE = "Water boils at 100 degrees Celsius at sea level."
RAMBLE = "Water boils when it is hot. " * 12


def group(pid: str, split: str = "train", **prompt) -> m.CompletionGroup:
    prompt.setdefault("text", "At what temperature does water boil?")
    return m.CompletionGroup(
        prompt_id=pid,
        prompt=m.Prompt(id=pid, dataset_split=split, **prompt),
        completions=[
            m.Completion(index=0, text=RAMBLE, finish_reason="length", num_tokens=128),
            m.Completion(index=1, text=CONCISE, finish_reason="stop", num_tokens=12),
            m.Completion(index=2, text=RAMBLE[:150], finish_reason="stop", num_tokens=36),
        ],
        policy_version=5,
    )


def test_groups_in_scores_and_pairs_out_eval_has_none_bad_is_dead_lettered(kafka, topics):
    settings = JudgeSettings(
        kafka=kafka, topics=topics, group_id=f"{topics.prefix}judge", grpc={"enabled": False}
    )
    metrics = Metrics("judge")
    processor = build(settings, metrics, ServiceServer("judge", metrics, HttpSettings(port=0)))
    groups = [group("p-a"), group("p-b"), group("p-eval", split="eval")]
    unusable = m.CompletionGroup(  # a prompt id but no prompt: nothing to judge against
        prompt_id="p-bad", completions=[m.Completion(index=0, text="x")]
    )
    producer = Producer(kafka)
    for g in [*groups, unusable]:
        producer.send_sync(topics.name("completions"), g)

    with running(processor):
        scored = wait_records(kafka, topics.name("scored"), m.ScoredGroup, 3)
        pairs = wait_records(kafka, topics.name("pairs"), m.PreferencePair, 2)
        dead = wait_records(kafka, topics.name("dlq"), m.DeadLetter, 1)
        wait_until(
            lambda: (
                sum(committed(kafka, settings.group_id, topics.name("completions")).values()) == 4
            ),
            what="offsets committed",
        )
    producer.close()

    by_prompt = {r.message.group.prompt_id: r.message for r in scored}
    assert sorted(by_prompt) == ["p-a", "p-b", "p-eval"]
    for s in by_prompt.values():
        assert s.judge_id == "fn:concise" and len(s.scores) == 3
        assert max(range(3), key=lambda i: s.scores[i]) == 1
    assert sorted(p.message.prompt_id for p in pairs) == ["p-a", "p-b"]  # eval: none
    for record in pairs:
        pair = record.message
        assert (pair.chosen, pair.chosen_index) == (CONCISE, 1)
        assert pair.rejected_index == 0  # truncated and rambling
        assert pair.margin > 0 and pair.policy_version == 5
        assert pair.scored_id == by_prompt[pair.prompt_id].id
        assert record.key == pair.id.encode()
    assert len(dead) == 1
    letter = dead[0].message
    assert letter.error_kind == "invalid" and "no prompt" in letter.error_message
    assert m.CompletionGroup.FromString(letter.original_value).prompt_id == "p-bad"
    assert sample_value(metrics, "groups_scored_total", backend="function", split="eval") == 1
    assert sample_value(metrics, "pairs_produced_total") == 2
    # Nothing else was produced: one scored per group, nothing twice.
    assert len(list(read_topic(kafka, topics.name("scored"), m.ScoredGroup))) == 3


def test_help_lists_the_settings():
    out = subprocess.run(
        [sys.executable, "-m", "onpolicy_judge", "--help"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "ONPOLICY_JUDGE_BACKEND='function'" in out
    assert "ONPOLICY_JUDGE_PAIRS__MIN_MARGIN" in out


def test_bad_settings_exit_2_naming_the_field():
    proc = subprocess.run(
        [sys.executable, "-m", "onpolicy_judge"],
        capture_output=True,
        text=True,
        env={"ONPOLICY_JUDGE_BACKEND": "oracle", "PATH": ""},
    )
    assert proc.returncode == 2
    assert "backend" in proc.stderr and "ONPOLICY_JUDGE_BACKEND" in proc.stderr
