"""`onpolicy publish` and `onpolicy export` against the real broker."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pyarrow.parquet as pq
from _util import wait_records

from onpolicy import messages as m
from onpolicy.bus import Producer, read_topic


def cli(kafka, topics, *args):
    env = {
        **os.environ,
        "ONPOLICY_KAFKA__BOOTSTRAP_SERVERS": kafka.bootstrap_servers,
        "ONPOLICY_TOPICS__PREFIX": topics.prefix,
    }
    return subprocess.run(
        [sys.executable, "-m", "onpolicy.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_publish_validates_every_line_and_sends_all_or_nothing(kafka, topics, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "ok"}) + "\n" + json.dumps({"text": ""}) + "\n")
    result = cli(kafka, topics, "publish", str(bad))
    assert result.returncode == 1 and "line 2" in result.stderr
    assert list(read_topic(kafka, topics.name("prompts"), m.Prompt)) == []

    good = tmp_path / "good.jsonl"
    good.write_text("".join(json.dumps({"text": f"Question {i}?"}) + "\n" for i in range(5)))
    result = cli(kafka, topics, "publish", str(good))
    assert result.returncode == 0, result.stderr
    records = wait_records(kafka, topics.name("prompts"), m.Prompt, 5)
    assert sorted(r.message.text for r in records) == [f"Question {i}?" for i in range(5)]


def test_export_writes_trl_rows_once_per_pair(kafka, topics, tmp_path):
    producer = Producer(kafka)
    prompt = m.Prompt(messages=[m.ChatMessage(role="user", content="Hi")])
    pairs = [
        m.validate(
            m.PreferencePair(
                prompt_id="p",
                prompt=prompt,
                chosen=f"c{i}",
                rejected=f"r{i}",
                chosen_index=i,
                rejected_index=9,
                policy_version=1,
            )
        )
        for i in range(3)
    ]
    for pair in [*pairs, pairs[0]]:  # one duplicate delivery
        producer.send_sync(topics.name("pairs"), pair)
    producer.close()
    out = tmp_path / "pairs.parquet"
    result = cli(kafka, topics, "export", "--out", str(out))
    assert result.returncode == 0, result.stderr
    rows = pq.read_table(out).to_pylist()
    assert sorted(r["pair_id"] for r in rows) == sorted(p.id for p in pairs)
    assert rows[0]["prompt"] == [{"role": "user", "content": "Hi"}]
    assert rows[0]["chosen"][0]["role"] == "assistant"
