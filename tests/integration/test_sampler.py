"""The sampler against the real vLLM CPU server and the real Kafka broker."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import uuid
from contextlib import contextmanager

import httpx
import pytest
from _util import running, sample_value, wait_records, wait_until
from kafka import KafkaProducer

from onpolicy import ids
from onpolicy import messages as m
from onpolicy.bus import Producer, ensure_topics, read_topic
from onpolicy.settings import HttpSettings, TopicSettings, load_settings
from onpolicy.telemetry import Metrics, ServiceServer
from onpolicy_sampler.adapters import adapter_name, content_digest
from onpolicy_sampler.app import SamplerService, add_checks
from onpolicy_sampler.settings import SamplerSettings

pytestmark = pytest.mark.vllm


def sampler(kafka, topics, url, tmp_path, **overrides) -> SamplerService:
    fields = dict(
        kafka=kafka,
        topics=topics,
        vllm_url=url,
        num_samples=3,
        max_tokens=24,
        concurrency=8,
        adapter_cache_dir=tmp_path / "adapters",
        group_id=f"{topics.prefix}sampler",
        round_protocol=False,  # these tests publish prompts without planned rounds
        handoff="lora",  # the merged hand-off: test_handoff.py
    )
    settings = load_settings(SamplerSettings, **(fields | overrides))
    return SamplerService(settings, Metrics("sampler"))


def peft_adapter(model_dir, out, r: int = 8, seed: int = 0):
    """A real LoRA adapter made by PEFT, with random (non-zero) weights so it changes outputs."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    peft = get_peft_model(
        model,
        LoraConfig(
            r=r, lora_alpha=4 * r, target_modules=["q_proj", "v_proj"], init_lora_weights=False
        ),
    )
    peft.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def adapter_dir(model_dir, tmp_path_factory):
    return peft_adapter(model_dir, tmp_path_factory.mktemp("adapter") / "policy-v1")


@pytest.fixture(scope="module")
def other_run_adapter_dir(model_dir, tmp_path_factory):
    """Another run's (another lineage's) version 1: same folder name, other weights."""
    return peft_adapter(model_dir, tmp_path_factory.mktemp("run-b") / "policy-v1", seed=1)


@pytest.fixture(scope="module")
def rank32_adapter_dir(model_dir, tmp_path_factory):
    """Rank 32: above the stack's --max-lora-rank 16."""
    return peft_adapter(model_dir, tmp_path_factory.mktemp("rank32") / "policy-v1", r=32, seed=2)


@contextmanager
def with_readyz(service: SamplerService):
    """The service's /readyz as service_main serves it (the app's checks, a real server)."""
    server = ServiceServer("sampler", service.metrics, HttpSettings(host="127.0.0.1", port=0))
    add_checks(service, server)
    server.start()
    try:
        yield lambda: httpx.get(f"http://127.0.0.1:{server.port}/readyz", timeout=10)
    finally:
        server.stop()


def served_models(url: str) -> dict[str, dict]:
    return {d["id"]: d for d in httpx.get(f"{url}/v1/models", timeout=10).json()["data"]}


def test_n_samples_per_prompt_with_ids_lineage_and_version(
    kafka, topics, vllm_server, tmp_path, model_dir
):
    chat = m.validate(
        m.Prompt(
            messages=[m.ChatMessage(role="user", content="Name a fruit.")],
            system_prompt="Answer in one word.",
            metadata={"src": "t"},
        )
    )
    text = m.validate(
        m.Prompt(
            text="The capital of France is",
            num_samples=2,
            sampling=m.SamplingParams(max_tokens=8, seed=1),
        )
    )
    producer = Producer(kafka)
    producer.send_sync(topics.name("prompts"), chat)
    producer.send_sync(topics.name("prompts"), text)
    service = sampler(kafka, topics, vllm_server, tmp_path)
    with running(service):
        groups = {
            r.message.prompt_id: r
            for r in wait_records(kafka, topics.name("completions"), m.CompletionGroup, 2)
        }
    g = groups[chat.id].message
    assert groups[chat.id].key == ids.group_id(chat.id, 0).encode() == g.id.encode()
    assert g.prompt == chat and g.policy_version == 0 and g.model == "SmolLM2-135M-Instruct"
    assert [c.index for c in g.completions] == [0, 1, 2]
    assert all(c.text and c.num_tokens > 0 for c in g.completions)
    assert all(c.finish_reason in ("stop", "length") for c in g.completions)
    assert all(c.num_tokens <= 24 for c in g.completions)
    assert g.sampling.max_tokens == 24 and g.timings.latency_s > 0 and g.prompt_tokens > 0
    # Token-exact: the prompt's ids are the chat template's, each answer's ids are as drawn,
    # with EOS at the end exactly when the sample ended on it.
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    templated = tokenizer.apply_chat_template(
        m.model_input(chat), tokenize=True, add_generation_prompt=True
    )
    templated = templated["input_ids"] if hasattr(templated, "keys") else templated
    assert list(g.prompt_token_ids) == list(templated) and len(templated) == g.prompt_tokens
    for c in g.completions:
        assert len(c.token_ids) == c.num_tokens
        assert (c.token_ids[-1] == tokenizer.eos_token_id) == (c.finish_reason == "stop")
        assert not c.HasField("stop_string") and not c.HasField("stop_token_id")
        if c.finish_reason == "length":
            assert c.num_tokens == 24
    t = groups[text.id].message
    assert list(t.prompt_token_ids) == tokenizer("The capital of France is")["input_ids"]
    assert len(t.completions) == 2 and t.sampling.max_tokens == 8 and t.sampling.seed == 1
    assert all(c.num_tokens <= 8 for c in t.completions)
    assert sample_value(service.metrics, "groups_produced_total") == 2
    assert sample_value(service.metrics, "completion_tokens_total") == sum(
        c.num_tokens for r in groups.values() for c in r.message.completions
    )


def test_a_stop_string_answer_is_recorded_and_trained_as_drawn(
    kafka, topics, vllm_server, tmp_path
):
    """vLLM trims a stop string from the text but returns the tokens it drew: those are what
    the pair carries and the trainer trains, with no EOS that was never sampled."""
    from onpolicy_judge.pairs import make_pair
    from onpolicy_trainer.pairs import to_row

    count = m.validate(
        m.Prompt(
            messages=[m.ChatMessage(role="user", content="Count from 1 to 10, with commas.")],
            sampling=m.SamplingParams(temperature=0.0, max_tokens=40, stop=["5"]),
            num_samples=1,  # greedy: vLLM takes n=1 only
        )
    )
    Producer(kafka).send_sync(topics.name("prompts"), count)
    with running(sampler(kafka, topics, vllm_server, tmp_path)):
        [record] = wait_records(kafka, topics.name("completions"), m.CompletionGroup, 1)
    group = record.message
    c = group.completions[0]
    assert (c.finish_reason, c.stop_string) == ("stop", "5")
    assert "5" not in c.text and len(c.token_ids) == c.num_tokens
    # A second, cut-off answer to pair it with.
    group.completions.add(
        index=1, text="1, 2", token_ids=c.token_ids[:3], num_tokens=3, finish_reason="length"
    )
    scored = m.ScoredGroup(id="s", group=group, scores=[1.0, 0.0], judge_id="j")
    row = to_row(make_pair(scored, 0, 1, 1.0))
    assert row["chosen_ids"] == list(c.token_ids)  # the stop string's tokens, no EOS added
    assert row["prompt_ids"] == list(group.prompt_token_ids)
    assert row["chosen_finish_reason"] == "stop"


def test_policy_update_switches_the_served_adapter(
    kafka, topics, vllm_server, tmp_path, adapter_dir
):
    greedy = m.SamplingParams(temperature=0.0, max_tokens=16)
    question = [m.ChatMessage(role="user", content="Write a short greeting.")]
    producer = Producer(kafka)
    service = sampler(kafka, topics, vllm_server, tmp_path, num_samples=1)
    with running(service):
        before = m.validate(m.Prompt(id="before", messages=question, sampling=greedy))
        producer.send_sync(topics.name("prompts"), before)
        wait_records(kafka, topics.name("completions"), m.CompletionGroup, 1)
        # A remote-looking URI (file://) goes through fsspec like object storage would.
        update = m.validate(
            m.PolicyUpdate(
                version=1, adapter_uri=f"file://{adapter_dir}", base_model="SmolLM2-135M-Instruct"
            )
        )
        producer.send_sync(topics.name("policy"), update)
        wait_until(lambda: service.tracker.current.version == 1, 120, "policy v1 loaded")
        after = m.validate(m.Prompt(id="after", messages=question, sampling=greedy))
        producer.send_sync(topics.name("prompts"), after)
        groups = {
            r.message.prompt_id: r.message
            for r in wait_records(kafka, topics.name("completions"), m.CompletionGroup, 2)
        }
    name = adapter_name(1, content_digest(adapter_dir))
    assert groups["before"].policy_version == 0
    assert groups["after"].policy_version == 1 and groups["after"].model == name
    assert groups["after"].id == ids.group_id("after", 1)
    # Greedy decoding of the same prompt: the adapter changed what the server answers.
    assert groups["after"].completions[0].text != groups["before"].completions[0].text
    # vLLM serves that name from this adapter's folder.
    assert served_models(vllm_server)[name]["root"] == str(adapter_dir)


def test_restarted_sampler_serves_the_newest_policy_before_taking_prompts(
    kafka, topics, vllm_server, tmp_path, adapter_dir, model_dir
):
    producer = Producer(kafka)
    for version in (1, 2):
        producer.send_sync(
            topics.name("policy"),
            m.validate(
                m.PolicyUpdate(
                    version=version, adapter_uri=str(adapter_dir), base_model=str(model_dir)
                )
            ),
        )
    producer.send_sync(topics.name("prompts"), m.validate(m.Prompt(text="Hello", num_samples=1)))
    service = sampler(kafka, topics, vllm_server, tmp_path)
    with running(service):
        [group] = wait_records(kafka, topics.name("completions"), m.CompletionGroup, 1)
    name = adapter_name(2, content_digest(adapter_dir))
    assert group.message.policy_version == 2 and group.message.model == name
    assert served_models(vllm_server)[name]["root"] == str(adapter_dir)


def test_invalid_prompts_are_dead_lettered_and_the_stream_goes_on(
    kafka, topics, vllm_server, tmp_path
):
    raw = KafkaProducer(bootstrap_servers=kafka.bootstrap_servers)
    source = topics.name("prompts")
    raw.send(source, b'{"text": ""}', partition=0).get(30)  # empty
    raw.send(source, b'{"text": "unterminated', partition=0).get(30)  # malformed JSON
    too_long = json.dumps({"text": "word " * 5000}).encode()  # > max-model-len
    raw.send(source, too_long, partition=0).get(30)
    over_budget = json.dumps({"text": "word " * 100, "sampling": {"maxTokens": 1}}).encode()
    raw.send(source, over_budget, partition=0).get(30)
    raw.send(source, b'{"text": "Say hi.", "numSamples": 1}', partition=0).get(30)
    raw.close()
    with running(sampler(kafka, topics, vllm_server, tmp_path, max_prompt_tokens=64)):
        letters = wait_records(kafka, topics.name("dlq"), m.DeadLetter, 4, timeout=120)
        wait_records(kafka, topics.name("completions"), m.CompletionGroup, 1)
    reasons = {d.message.offset: (d.message.error_kind, d.message.error_message) for d in letters}
    assert reasons[0][0] == "invalid" and "empty" in reasons[0][1]
    assert reasons[1][0] == "decode" and "invalid JSON" in reasons[1][1]
    assert reasons[2][0] == "invalid" and "vLLM rejected the prompt (400)" in reasons[2][1]
    assert "context" in reasons[2][1] or "length" in reasons[2][1]
    assert reasons[3][0] == "invalid" and "sampler.max_prompt_tokens (64)" in reasons[3][1]


def test_prompts_published_with_kcat_as_the_readme_shows_are_sampled(
    kafka, topics, vllm_server, tmp_path
):
    """The README's one-liner (`kcat -P -l prompts.jsonl`): one record per line, no key, no
    headers; the sampler takes each as a prompt (a JSON object with no content-type header
    is protobuf's JSON form) and dead-letters none."""
    kcat = shutil.which("kcat")
    if kcat is None:
        reason = "no `kcat` on PATH (apt-get install kcat; .ci/run does)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(reason, pytrace=False)
        pytest.skip(reason)
    lines = tmp_path / "prompts.jsonl"
    lines.write_text(
        '{"text": "Say hi.", "numSamples": 1}\n'
        '{"messages": [{"role": "user", "content": "Name a colour."}], "numSamples": 2}\n'
    )
    source = topics.name("prompts")
    command = [kcat, "-b", kafka.bootstrap_servers, "-P", "-t", source, "-l", str(lines)]
    subprocess.run(command, check=True, timeout=30, capture_output=True)
    published = list(read_topic(kafka, source, m.Prompt))
    assert [r.key for r in published] == [None, None]
    assert all(not r.headers for r in published)
    with running(sampler(kafka, topics, vllm_server, tmp_path)):
        groups = [
            r.message for r in wait_records(kafka, topics.name("completions"), m.CompletionGroup, 2)
        ]
    by_text = {g.prompt.text or g.prompt.messages[-1].content: g for g in groups}
    assert set(by_text) == {"Say hi.", "Name a colour."}
    assert len(by_text["Say hi."].completions) == 1
    assert len(by_text["Name a colour."].completions) == 2
    assert all(c.text for g in groups for c in g.completions)
    assert list(read_topic(kafka, topics.name("dlq"), m.DeadLetter)) == []


def test_vllm_restart_mid_stream_loses_and_duplicates_nothing(kafka, topics, vllm, tmp_path):
    vllm.start()
    producer = Producer(kafka)
    prompts = [m.validate(m.Prompt(text=f"Count to {i}:", num_samples=2)) for i in range(12)]
    service = sampler(kafka, topics, vllm.url, tmp_path, max_tokens=48, concurrency=4)
    with running(service):
        for p in prompts:
            producer.send_sync(topics.name("prompts"), p)
        wait_until(
            lambda: (
                len(list(read_topic(kafka, topics.name("completions"), m.CompletionGroup))) >= 2
            ),
            120,
            "first groups",
        )
        vllm.stop()  # mid-stream: requests in flight fail, the rest wait
        wait_until(lambda: not service.backend_ok, 60, "the sampler to notice")
        vllm.start()
        records = wait_records(
            kafka, topics.name("completions"), m.CompletionGroup, 12, timeout=300
        )
        wait_until(lambda: service.backend_ok, 60, "recovery")
    keys = [r.key for r in records]
    assert len(keys) == len(set(keys)) == 12
    assert {r.message.prompt_id for r in records} == {p.id for p in prompts}
    assert list(read_topic(kafka, topics.name("dlq"), m.DeadLetter)) == []


GREEDY = m.SamplingParams(temperature=0.0, max_tokens=16)
QUESTION = [m.ChatMessage(role="user", content="Write a short greeting.")]


def policy_update(version: int, adapter, model_dir) -> m.PolicyUpdate:
    return m.validate(
        m.PolicyUpdate(version=version, adapter_uri=str(adapter), base_model=str(model_dir))
    )


def greedy_text(url: str, model: str) -> str:
    body = httpx.post(
        f"{url}/v1/chat/completions",
        json={
            "model": model,
            "messages": [{"role": "user", "content": QUESTION[0].content}],
            "temperature": 0.0,
            "max_tokens": 16,
        },
        timeout=120,
    ).json()
    return body["choices"][0]["message"]["content"]


def test_two_runs_in_a_row_on_one_vllm_each_sample_their_own_adapter(
    kafka, topics, vllm_server, tmp_path, model_dir, adapter_dir, other_run_adapter_dir
):
    """The reported bug: a second run's v1 sampled from the first run's v1 (same name, and
    "already loaded" taken for success). Two lineages, same prefix and version, other weights."""
    second = TopicSettings(prefix=f"test-{uuid.uuid4().hex[:8]}.", partitions=2)
    ensure_topics(kafka, second)
    # Worst case for run 2: vLLM already has run 2's name, rooted in run 1's folder.
    stale = adapter_name(1, content_digest(other_run_adapter_dir))
    response = httpx.post(
        f"{vllm_server}/v1/load_lora_adapter",
        json={"lora_name": stale, "lora_path": str(adapter_dir)},
        timeout=60,
    )
    assert response.status_code == 200, response.text
    producer = Producer(kafka)
    groups = []
    for run_topics, adapter in ((topics, adapter_dir), (second, other_run_adapter_dir)):
        producer.send_sync(run_topics.name("policy"), policy_update(1, adapter, model_dir))
        producer.send_sync(
            run_topics.name("prompts"),
            m.validate(m.Prompt(id="q", messages=QUESTION, sampling=GREEDY)),
        )
        service = sampler(
            kafka, run_topics, vllm_server, tmp_path / run_topics.prefix, num_samples=1
        )
        with running(service):
            [group] = wait_records(
                kafka, run_topics.name("completions"), m.CompletionGroup, 1, timeout=180
            )
        groups.append(group.message)
    first, other = groups
    assert first.policy_version == other.policy_version == 1
    assert first.model != other.model
    assert other.model == stale
    served = served_models(vllm_server)
    # Each name each sampler requested is rooted in its own run's adapter.
    assert served[first.model]["root"] == str(adapter_dir)
    assert served[other.model]["root"] == str(other_run_adapter_dir)
    # And the samples come from those adapters: greedy decoding through each name again.
    assert first.completions[0].text == greedy_text(vllm_server, first.model)
    assert other.completions[0].text == greedy_text(vllm_server, other.model)
    assert first.completions[0].text != other.completions[0].text


def test_adapter_above_the_max_rank_makes_the_replica_not_ready_until_a_later_version(
    kafka, topics, vllm_server, tmp_path, model_dir, adapter_dir, rank32_adapter_dir
):
    producer = Producer(kafka)
    service = sampler(kafka, topics, vllm_server, tmp_path, num_samples=1, max_lora_rank=16)
    with running(service), with_readyz(service) as readyz:
        wait_until(lambda: readyz().status_code == 200, 60, "ready")
        producer.send_sync(topics.name("policy"), policy_update(1, rank32_adapter_dir, model_dir))
        wait_until(lambda: service.tracker.failure is not None, 60, "the refusal")
        assert service.tracker.failure.reason == "rank" and service.tracker.failure.permanent
        answer = readyz()
        assert answer.status_code == 503 and answer.json()["checks"]["policy"] is False
        assert sample_value(service.metrics, "policy_load_failures_total", reason="rank") == 1
        assert sample_value(service.metrics, "policy_load_failed") == 1
        roots = {d.get("root") for d in served_models(vllm_server).values()}
        assert str(rank32_adapter_dir) not in roots
        # Still sampling, and honestly stamped: the base model, version 0.
        producer.send_sync(topics.name("prompts"), m.validate(m.Prompt(id="a", text="Hi")))
        [before] = wait_records(kafka, topics.name("completions"), m.CompletionGroup, 1)
        assert before.message.policy_version == 0
        assert before.message.model == "SmolLM2-135M-Instruct"
        # A later good version loads and readiness comes back.
        producer.send_sync(topics.name("policy"), policy_update(2, adapter_dir, model_dir))
        wait_until(lambda: service.tracker.current.version == 2, 120, "v2 loaded")
        wait_until(lambda: readyz().status_code == 200, 30, "ready again")
        assert service.tracker.failure is None
        assert sample_value(service.metrics, "policy_load_failed") == 0
        producer.send_sync(topics.name("prompts"), m.validate(m.Prompt(id="b", text="Hi")))
        records = wait_records(kafka, topics.name("completions"), m.CompletionGroup, 2)
    after = next(r.message for r in records if r.message.prompt_id == "b")
    assert after.policy_version == 2
    assert after.model == adapter_name(2, content_digest(adapter_dir))
    assert served_models(vllm_server)[after.model]["root"] == str(adapter_dir)


def test_vllm_refusing_an_adapter_is_permanent_and_does_not_block_later_versions(
    kafka, topics, vllm_server, tmp_path, model_dir, adapter_dir, rank32_adapter_dir
):
    """A sampler whose max_lora_rank is above vLLM's (misconfigured): vLLM itself refuses."""
    producer = Producer(kafka)
    service = sampler(kafka, topics, vllm_server, tmp_path, num_samples=1, max_lora_rank=64)
    with running(service), with_readyz(service) as readyz:
        producer.send_sync(topics.name("policy"), policy_update(1, rank32_adapter_dir, model_dir))
        wait_until(lambda: service.tracker.failure is not None, 60, "the refusal")
        failure = service.tracker.failure
        assert failure.reason == "vllm_refused" and failure.permanent, failure
        assert "max_lora_rank" in failure.message
        assert readyz().status_code == 503
        assert httpx.get(f"{vllm_server}/health", timeout=10).status_code == 200
        producer.send_sync(topics.name("policy"), policy_update(2, adapter_dir, model_dir))
        wait_until(lambda: service.tracker.current.version == 2, 120, "v2 loaded")
        wait_until(lambda: readyz().status_code == 200, 30, "ready again")
    assert sample_value(service.metrics, "policy_load_failures_total", reason="vllm_refused") == 1


def test_adapter_not_there_yet_is_retried_not_skipped(
    kafka, topics, vllm_server, tmp_path, model_dir, adapter_dir
):
    later = tmp_path / "shared-volume" / "policy-v1"
    producer = Producer(kafka)
    service = sampler(kafka, topics, vllm_server, tmp_path, num_samples=1, policy_retry_max_s=1.0)
    with running(service), with_readyz(service) as readyz:
        wait_until(lambda: readyz().status_code == 200, 60, "ready")
        producer.send_sync(topics.name("policy"), policy_update(1, later, model_dir))
        wait_until(
            lambda: service.tracker.failure is not None and service.tracker.failure.attempts >= 3,
            60,
            "three failed fetches",
        )
        assert service.tracker.failure.reason == "fetch" and not service.tracker.failure.permanent
        assert readyz().status_code == 503
        assert sample_value(service.metrics, "policy_load_failures_total", reason="fetch") >= 3
        shutil.copytree(adapter_dir, later)  # the trainer's folder shows up on the volume
        wait_until(lambda: service.tracker.current.version == 1, 60, "v1 loaded")
        wait_until(lambda: readyz().status_code == 200, 30, "ready again")
        producer.send_sync(topics.name("prompts"), m.validate(m.Prompt(id="q", text="Hi")))
        [group] = wait_records(kafka, topics.name("completions"), m.CompletionGroup, 1)
    assert group.message.policy_version == 1
    assert served_models(vllm_server)[group.message.model]["root"] == str(later)
