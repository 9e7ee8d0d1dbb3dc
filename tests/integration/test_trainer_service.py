"""The trainer against the real broker, real TRL on SmolLM2-135M, and the real vLLM server.

Rounds are tiny (8 pairs, max_length 160) so that each trains in well under a minute on
two shared cores.
"""

from __future__ import annotations

import functools
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pyarrow.parquet as pq
from _util import committed, running, sample_value, scored, wait_records, wait_until
from fastapi.testclient import TestClient

from onpolicy import messages as m
from onpolicy.bus import Producer, read_topic
from onpolicy.settings import HttpSettings
from onpolicy.telemetry import Metrics, ServiceServer
from onpolicy_trainer.app import build
from onpolicy_trainer.rounds import CRASH_ENV
from onpolicy_trainer.settings import TrainerSettings
from onpolicy_trainer.synthetic import make_pairs as synthetic_pairs

ROUND = 8
# Long enough for the longest synthetic pair (the trainer drops longer pairs, never cuts).
TINY = {"max_length": 160, "learning_rate": 2e-4}


@functools.cache
def _tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(TrainerSettings().model)


def make_pairs(*args, **kwargs) -> list[m.PreferencePair]:
    """Synthetic pairs with sampled token ids, as the judge would publish them."""
    return synthetic_pairs(*args, tokenizer=_tokenizer(), **kwargs)


def settings_for(kafka, topics, model_dir: Path, checkpoints: Path, **overrides) -> TrainerSettings:
    values = {
        "kafka": kafka,
        "topics": topics,
        "model": str(model_dir),
        "checkpoint_uri": str(checkpoints),
        "group_id": f"{topics.prefix}trainer",
        "round_size": ROUND,
        "round_protocol": False,  # these tests publish pairs directly, with no planned round
    }
    return TrainerSettings(**(values | TINY | overrides))


def service(settings: TrainerSettings):
    metrics = Metrics("trainer")
    server = ServiceServer("trainer", metrics, HttpSettings(port=0))
    processor = build(settings, metrics, server)
    return processor, TestClient(server.app), metrics


def publish(kafka, topic: str, messages) -> None:
    producer = Producer(kafka)
    try:
        for message in messages:
            producer.send_sync(topic, message)
    finally:
        producer.close()


def wait_first_round(kafka, topics, settings: TrainerSettings):
    """The v1 PolicyUpdate, once the round's offsets are committed (only after it is out)."""
    [record] = wait_records(kafka, topics.name("policy"), m.PolicyUpdate, 1, timeout=600)
    wait_until(
        lambda: sum(committed(kafka, settings.group_id, topics.name("pairs")).values()) == ROUND,
        timeout=30,
        what="offsets committed",
    )
    return record


def test_round_from_kafka_trains_saves_publishes_and_loads_into_vllm(
    kafka, topics, model_dir, vllm_server, tmp_path
):
    settings = settings_for(kafka, topics, model_dir, tmp_path / "ckpt")
    pairs = make_pairs(ROUND, policy_version=0)
    publish(kafka, topics.name("pairs"), pairs)
    processor, client, metrics = service(settings)
    assert client.get("/policy").json()["version"] == 0

    with running(processor):
        record = wait_first_round(kafka, topics, settings)
        rounds = client.get("/rounds").json()
        policy = client.get("/policy").json()

    update = record.message
    metrics_ = dict(update.metrics)
    assert (update.version, update.num_pairs, update.base_model) == (1, ROUND, str(model_dir))
    assert math.isfinite(metrics_["loss"])
    assert metrics_["rewards/margins"] > 0, metrics_
    assert metrics_["pairs"] == ROUND and metrics_["seconds"] > 0
    for key in ("rewards/chosen", "rewards/rejected", "rewards/accuracies"):
        assert math.isfinite(metrics_[key])
    adapter = Path(update.adapter_uri)
    assert adapter == tmp_path / "ckpt" / "policy-v1"
    assert (adapter / "adapter_model.safetensors").exists()
    # handoff=merged (the default): the adapter merged into full weights for the samplers.
    merged = Path(update.checkpoint_uri)
    assert merged == tmp_path / "ckpt" / "merged-v1"
    assert (merged / "config.json").exists() and (merged / "model.safetensors").exists()
    assert (merged / "tokenizer.json").exists()

    table = pq.read_table(tmp_path / "ckpt" / "datasets" / "round-1.parquet")
    assert sorted(table.column("pair_id").to_pylist()) == sorted(p.id for p in pairs)
    row = table.slice(0, 1).to_pylist()[0]
    assert row["chosen"][0]["role"] == "assistant" and row["prompt"][-1]["role"] == "user"

    assert rounds["current_version"] == 1
    assert [r["version"] for r in rounds["rounds"]] == [1]
    assert rounds["rounds"][0]["published"] is True
    assert policy["version"] == 1 and policy["policy_uri"] == str(adapter)
    assert metrics.registry.get_sample_value("onpolicy_trainer_policy_version") == 1

    # The adapter loads into vLLM at run time and serves a chat completion.
    name = f"{topics.prefix}policy-v1"
    with httpx.Client(base_url=vllm_server, timeout=120) as http:
        loaded = http.post(
            "/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(adapter)}
        )
        assert loaded.status_code == 200, loaded.text
        reply = http.post(
            "/v1/chat/completions",
            json={
                "model": name,
                "messages": [{"role": "user", "content": "What is the capital of France?"}],
                "max_tokens": 16,
                "temperature": 0,
            },
        )
        assert reply.status_code == 200, reply.text
        assert reply.json()["choices"][0]["message"]["content"].strip()
        assert reply.json()["model"] == name


def test_stale_and_duplicate_pairs_are_dropped_counted_and_trigger_runs_a_round(
    kafka, topics, model_dir, tmp_path
):
    # The policy topic already holds v1 (e.g. an earlier trainer): the trainer starts there.
    earlier = m.PolicyUpdate(version=1, adapter_uri="/nonexistent/policy-v1", base_model="b")
    publish(kafka, topics.name("policy"), [earlier])
    settings = settings_for(kafka, topics, model_dir, tmp_path / "ckpt", round_size=100)
    stale = make_pairs(2, policy_version=0)
    [fresh] = make_pairs(1, policy_version=1, round_=7)
    # Longer than max_length: dropped and counted, never cut into another context.
    [too_long] = make_pairs(1, policy_version=1, round_=8)
    too_long.chosen_token_ids.extend([42] * TINY["max_length"])
    # No sampled ids (an older judge): cannot be trained exactly as drawn.
    [no_ids] = synthetic_pairs(1, policy_version=1, round_=9)
    # The second fresh copy is a duplicate.
    publish(kafka, topics.name("pairs"), [*stale, too_long, no_ids, fresh, fresh])
    processor, client, metrics = service(settings)

    def dropped(reason: str) -> float:
        value = metrics.registry.get_sample_value(
            "onpolicy_trainer_pairs_dropped_total", {"reason": reason}
        )
        return value or 0.0

    with running(processor):
        wait_until(lambda: dropped("stale") == 2, timeout=60, what="stale pairs dropped")
        wait_until(lambda: dropped("too_long") == 1, timeout=30, what="too long dropped")
        wait_until(lambda: dropped("no_token_ids") == 1, timeout=30, what="id-less dropped")
        wait_until(
            lambda: len(processor.runner.buffer) == 1, timeout=30, what="fresh pair buffered"
        )
        assert client.get("/policy").json()["buffered_pairs"] == 1
        # The second copy arrives while the first is buffered: the bus drops it by id (its
        # handler never runs) and holds its offset until the first one's round is published.
        wait_until(
            lambda: (
                sample_value(metrics, "duplicates_dropped_total", topic=topics.name("pairs")) == 1
            ),
            timeout=30,
            what="duplicate dropped",
        )
        # The buffered pair holds its partition's offset: only the dropped ones commit (the
        # fresh pair and its copy come last in their partition).
        wait_until(
            lambda: sum(committed(kafka, settings.group_id, topics.name("pairs")).values()) == 4,
            timeout=30,
            what="dropped offsets committed",
        )
        response = client.post("/rounds/trigger")
        assert response.status_code == 202, response.text
        assert response.json() == {"triggered": True, "pairs": 1, "next_version": 2}
        records = wait_records(kafka, topics.name("policy"), m.PolicyUpdate, 2, timeout=600)
        wait_until(
            lambda: sum(committed(kafka, settings.group_id, topics.name("pairs")).values()) == 6,
            timeout=30,
            what="all offsets committed",
        )
        assert client.post("/rounds/trigger").status_code == 409  # nothing buffered now

    assert [r.message.version for r in records] == [1, 2]
    assert records[1].message.num_pairs == 1
    table = pq.read_table(tmp_path / "ckpt" / "datasets" / "round-2.parquet")
    assert table.column("pair_id").to_pylist() == [fresh.id]
    assert dropped("stale") == 2 and dropped("duplicate") == 0


def test_next_rounds_pairs_wait_in_kafka_while_a_round_trains(kafka, topics, model_dir, tmp_path):
    """A full round pauses the consumer: pairs that arrive during it are fetched after it."""
    settings = settings_for(kafka, topics, model_dir, tmp_path / "ckpt")
    first = make_pairs(ROUND, policy_version=0)
    second = make_pairs(ROUND, policy_version=1, round_=10)
    processor, _, metrics = service(settings)
    runner = processor.runner
    real_train = runner.train
    started, release = threading.Event(), threading.Event()

    def train(*args, **kwargs):
        if not started.is_set():  # round 1 waits here until the test has looked
            started.set()
            assert release.wait(120)
        return real_train(*args, **kwargs)

    runner.train = train
    publish(kafka, topics.name("pairs"), first)
    with running(processor):
        assert started.wait(120), "round 1 did not start"
        publish(kafka, topics.name("pairs"), second)
        time.sleep(5)  # an unpaused consumer fetches them within a poll (1 s)
        consumed = sample_value(metrics, "records_consumed_total", topic=topics.name("pairs"))
        buffered = len(runner.buffer)
        release.set()
        records = wait_records(kafka, topics.name("policy"), m.PolicyUpdate, 2, timeout=600)
        wait_until(
            lambda: (
                sum(committed(kafka, settings.group_id, topics.name("pairs")).values()) == 2 * ROUND
            ),
            timeout=30,
            what="both rounds' offsets committed",
        )

    assert (consumed, buffered) == (ROUND, 0)
    assert [r.message.version for r in records] == [1, 2]
    table = pq.read_table(tmp_path / "ckpt" / "datasets" / "round-2.parquet")
    assert sorted(table.column("pair_id").to_pylist()) == sorted(p.id for p in second)


def test_round_in_two_processes_trains_data_parallel_and_saves_one_adapter(
    kafka, topics, model_dir, tmp_path
):
    """train_processes=2: the round runs under torchrun (gloo on these CPUs, NCCL on GPUs)."""
    from safetensors import safe_open

    settings = settings_for(
        kafka, topics, model_dir, tmp_path / "ckpt", train_processes=2, per_device_batch_size=2
    )
    pairs = make_pairs(ROUND, policy_version=0)
    publish(kafka, topics.name("pairs"), pairs)
    processor, _, _ = service(settings)
    with running(processor):
        record = wait_first_round(kafka, topics, settings)
    metrics_ = dict(record.message.metrics)
    assert metrics_["processes"] == 2 and math.isfinite(metrics_["loss"])
    # 8 pairs, 2 per device: two ranks take 4 pairs a step, so 2 steps (one process: 4).
    assert metrics_["steps"] == 2, metrics_
    adapter = Path(record.message.adapter_uri)
    with safe_open(str(adapter / "adapter_model.safetensors"), "pt") as weights:
        names = list(weights.keys())
    assert names and all("lora_" in n for n in names)
    table = pq.read_table(tmp_path / "ckpt" / "datasets" / "round-1.parquet")
    assert sorted(table.column("pair_id").to_pylist()) == sorted(p.id for p in pairs)


def test_round_sharded_with_fsdp_in_two_processes_publishes_a_whole_adapter(
    kafka, topics, model_dir, tmp_path
):
    """distributed=fsdp: FSDP2 (full shard) through accelerate, 2 ranks on gloo; rank 0
    gathers the full state dict and saves an adapter of the model's full shapes."""
    from safetensors import safe_open

    settings = settings_for(
        kafka,
        topics,
        model_dir,
        tmp_path / "ckpt",
        train_processes=2,
        distributed="fsdp",
        per_device_batch_size=4,
        learning_rate=1e-3,
    )
    pairs = make_pairs(ROUND, policy_version=0)
    publish(kafka, topics.name("pairs"), pairs)
    processor, client, _ = service(settings)
    with running(processor):
        record = wait_first_round(kafka, topics, settings)
        policy = client.get("/policy").json()
    metrics_ = dict(record.message.metrics)
    assert metrics_["processes"] == 2 and metrics_["fsdp"] == 1.0, metrics_
    assert metrics_["steps"] == 1, metrics_  # 8 pairs, 4 per rank, 2 ranks
    assert math.isfinite(metrics_["loss"]) and math.isfinite(metrics_["rewards/margins"])
    adapter = Path(record.message.adapter_uri)
    assert policy["version"] == 1 and policy["policy_uri"] == str(adapter)
    hidden, rank = 576, settings.lora_r  # SmolLM2-135M: shapes whole, not one rank's shard
    with safe_open(str(adapter / "adapter_model.safetensors"), "pt") as weights:
        names = list(weights.keys())
        q_a = weights.get_tensor(next(n for n in names if "q_proj.lora_A" in n))
        q_b = weights.get_tensor(next(n for n in names if "q_proj.lora_B" in n))
    assert len(names) == 30 * 4 * 2 and all("lora_" in n for n in names)
    assert tuple(q_a.shape) == (rank, hidden) and tuple(q_b.shape) == (hidden, rank)
    assert q_b.abs().sum() > 0  # PEFT starts B at zero: the round trained it
    merged = Path(record.message.checkpoint_uri)  # handoff=merged, as with DDP
    assert (merged / "model.safetensors").exists()


# ---------------------------------------------------------------------- crash safety
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_trainer(kafka, topics, model_dir, checkpoints, crash_at: str | None, port: int):
    env = {
        **os.environ,
        "ONPOLICY_KAFKA__BOOTSTRAP_SERVERS": kafka.bootstrap_servers,
        "ONPOLICY_KAFKA__SESSION_TIMEOUT_MS": "6000",
        "ONPOLICY_KAFKA__HEARTBEAT_INTERVAL_MS": "500",
        "ONPOLICY_TOPICS__PREFIX": topics.prefix,
        "ONPOLICY_TOPICS__PARTITIONS": str(topics.partitions),
        "ONPOLICY_TRAINER_MODEL": str(model_dir),
        "ONPOLICY_TRAINER_CHECKPOINT_URI": str(checkpoints),
        "ONPOLICY_TRAINER_GROUP_ID": f"{topics.prefix}trainer",
        "ONPOLICY_TRAINER_ROUND_SIZE": str(ROUND),
        "ONPOLICY_TRAINER_ROUND_PROTOCOL": "false",
        "ONPOLICY_TRAINER_MAX_LENGTH": str(TINY["max_length"]),
        "ONPOLICY_TRAINER_LEARNING_RATE": str(TINY["learning_rate"]),
        "ONPOLICY_TRAINER_HTTP__PORT": str(port),
        "HF_HUB_OFFLINE": "1",
    }
    env.pop(CRASH_ENV, None)
    if crash_at:
        env[CRASH_ENV] = crash_at
    return subprocess.Popen([sys.executable, "-m", "onpolicy_trainer"], env=env)


def versions(kafka, topics) -> list[int]:
    return [r.message.version for r in read_topic(kafka, topics.name("policy"), m.PolicyUpdate)]


def scrape(port: int, name: str, **labels: str) -> float:
    try:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    except httpx.TransportError:  # still starting: no server yet
        return -1.0
    want = name + ("{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}" if labels else "")
    for line in text.splitlines():
        if line.startswith(want + " "):
            return float(line.split()[-1])
    return 0.0


def test_kill_between_save_publish_and_commit_loses_nothing_and_repeats_nothing(
    kafka, topics, model_dir, tmp_path
):
    ckpt = tmp_path / "ckpt"
    batches = [make_pairs(ROUND, policy_version=v, round_=10 * v) for v in range(3)]
    pairs_topic = topics.name("pairs")
    procs: list[subprocess.Popen] = []
    try:
        # 1) Killed after saving policy-v1, before publishing it.
        publish(kafka, pairs_topic, batches[0])
        proc = start_trainer(kafka, topics, model_dir, ckpt, "after_save@1", free_port())
        procs.append(proc)
        assert proc.wait(timeout=600) == -signal.SIGKILL
        assert (ckpt / "policy-v1" / "round.json").exists()
        assert versions(kafka, topics) == []

        # 2) Restart: v1 is published from the store, not retrained; its redelivered pairs
        #    are dropped by id. Killed after publishing v2, before committing its pairs.
        port = free_port()
        proc = start_trainer(kafka, topics, model_dir, ckpt, "after_publish@2", port)
        procs.append(proc)
        wait_until(lambda: versions(kafka, topics) == [1], timeout=120, what="v1 published")
        wait_until(
            lambda: (
                scrape(port, "onpolicy_trainer_pairs_dropped_total", reason="duplicate") == ROUND
            ),
            timeout=120,
            what="redelivered round-1 pairs dropped",
        )
        publish(kafka, pairs_topic, batches[1])
        assert proc.wait(timeout=600) == -signal.SIGKILL
        assert versions(kafka, topics) == [1, 2]

        # 3) Restart: nothing is republished; round 2's uncommitted pairs are dropped by id.
        port = free_port()
        proc = start_trainer(kafka, topics, model_dir, ckpt, None, port)
        procs.append(proc)
        wait_until(
            lambda: (
                scrape(port, "onpolicy_trainer_pairs_dropped_total", reason="duplicate") == ROUND
            ),
            timeout=120,
            what="redelivered round-2 pairs dropped",
        )
        publish(kafka, pairs_topic, batches[2])
        wait_until(lambda: 3 in versions(kafka, topics), timeout=600, what="v3 published")
        wait_until(
            lambda: (
                sum(committed(kafka, f"{topics.prefix}trainer", pairs_topic).values()) == 3 * ROUND
            ),
            timeout=30,
            what="every offset committed",
        )
        rounds = httpx.get(f"http://127.0.0.1:{port}/rounds", timeout=5).json()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()

    assert versions(kafka, topics) == [1, 2, 3]
    assert [r["version"] for r in rounds["rounds"]] == [1, 2, 3]
    trained = []
    for version, batch in enumerate(batches, start=1):
        ids = pq.read_table(ckpt / "datasets" / f"round-{version}.parquet").column("pair_id")
        assert sorted(ids.to_pylist()) == sorted(p.id for p in batch)
        trained += ids.to_pylist()
    assert len(trained) == len(set(trained)) == 3 * ROUND


def test_stop_during_a_round_cuts_it_short_and_saves_publishes_commits_nothing(
    kafka, topics, model_dir, tmp_path
):
    settings = settings_for(kafka, topics, model_dir, tmp_path / "ckpt")
    publish(kafka, topics.name("pairs"), make_pairs(ROUND, policy_version=0))
    processor, client, _ = service(settings)
    runner = processor.runner
    with running(processor):
        # The batch has left the buffer: the round is loading the model or training.
        wait_until(lambda: runner.claimed and not runner.buffer, timeout=120, what="a round")
    assert client.get("/rounds").json()["rounds"] == []
    assert list(read_topic(kafka, topics.name("policy"), m.PolicyUpdate)) == []
    assert sum(committed(kafka, settings.group_id, topics.name("pairs")).values()) == 0
    assert not (tmp_path / "ckpt").exists() or not any((tmp_path / "ckpt").rglob("*.parquet"))


def test_a_rejected_version_is_rolled_back_at_once_even_without_pairs(
    kafka, topics, model_dir, tmp_path
):
    """The guard acts on the verdict itself: v1 makes no pair at all, its held-out score
    falls below v0's, and the trainer publishes v2 with v0's weights right away; a pair v1
    sampled later is dropped, and a restarted trainer rolls back nothing twice."""
    from safetensors.torch import load_file

    earlier = m.PolicyUpdate(version=1, adapter_uri="/nonexistent/policy-v1", base_model="b")
    publish(kafka, topics.name("policy"), [earlier])
    prompts = [m.Prompt(id=f"h{i}", text=f"held-out {i}", dataset_split="eval") for i in range(4)]
    publish(kafka, topics.name("heldout"), prompts)
    good, bad = ([0.9, 0.8], [0.8, 0.9], [0.85, 0.8], [0.9, 0.9]), [[0.1, 0.2]] * 4
    publish(
        kafka,
        topics.name("scored"),
        [scored(topics, p.id, 0, s) for p, s in zip(prompts, good, strict=True)]
        + [scored(topics, p.id, 1, s) for p, s in zip(prompts, bad, strict=True)],
    )
    settings = settings_for(
        kafka, topics, model_dir, tmp_path / "ckpt", handoff="lora", evaluation={"margin_se": 2}
    )
    processor, client, metrics = service(settings)
    with running(processor):
        records = wait_records(kafka, topics.name("policy"), m.PolicyUpdate, 2, timeout=120)
        rollback = records[1].message
        assert (rollback.version, rollback.restored_version, rollback.rejected_version) == (2, 0, 1)
        assert rollback.num_pairs == 0
        # v0 restored: every LoRA B matrix is zero, so the samplers serve the base model.
        weights = load_file(str(Path(rollback.adapter_uri) / "adapter_model.safetensors"))
        b = [t for name, t in weights.items() if "lora_B" in name]
        assert b and all(float(t.abs().max()) == 0.0 for t in b)
        assert sample_value(metrics, "policy_rollbacks_total") == 1
        assert client.get("/evals").json()["results"][1]["verdict"] == "rejected"
        # A pair v1 sampled (arriving late) is never trained.
        publish(kafka, topics.name("pairs"), make_pairs(1, policy_version=1))
        wait_until(
            lambda: sample_value(metrics, "pairs_dropped_total", reason="rolled_back") == 1,
            timeout=60,
            what="the rejected version's pair dropped",
        )
    # Restarted: it knows v1 was rolled back (from the policy topic) and does not redo it.
    processor, client, metrics = service(settings)
    assert processor.runner.rejected_versions == {1} and processor.runner.current == 2
    with running(processor):
        wait_until(
            lambda: processor.runner.evaluator._caught_up.is_set(), timeout=60, what="caught up"
        )
        time.sleep(2)  # room for a wrong second rollback to be published
    versions = [r.message.version for r in read_topic(kafka, topics.name("policy"), m.PolicyUpdate)]
    assert versions == [1, 2]
