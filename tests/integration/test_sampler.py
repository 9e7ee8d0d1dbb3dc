"""The sampler against the real vLLM CPU server and the real Kafka broker."""

from __future__ import annotations

import json

import httpx
import pytest
from _util import running, sample_value, wait_records, wait_until
from kafka import KafkaProducer

from onpolicy import ids
from onpolicy import messages as m
from onpolicy.bus import Producer, read_topic
from onpolicy.settings import load_settings
from onpolicy.telemetry import Metrics
from onpolicy_sampler.app import SamplerService
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
    )
    settings = load_settings(SamplerSettings, **(fields | overrides))
    return SamplerService(settings, Metrics("sampler"))


@pytest.fixture(scope="module")
def adapter_dir(model_dir, tmp_path_factory):
    """A real LoRA adapter made by PEFT, with random (non-zero) weights so it changes outputs."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    peft = get_peft_model(
        model,
        LoraConfig(
            r=8, lora_alpha=32, target_modules=["q_proj", "v_proj"], init_lora_weights=False
        ),
    )
    out = tmp_path_factory.mktemp("adapter") / "policy-v1"
    peft.save_pretrained(out)
    return out


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
    assert groups["before"].policy_version == 0
    assert groups["after"].policy_version == 1 and groups["after"].model == "policy-v1"
    assert groups["after"].id == ids.group_id("after", 1)
    # Greedy decoding of the same prompt: the adapter changed what the server answers.
    assert groups["after"].completions[0].text != groups["before"].completions[0].text
    assert "policy-v1" in [d["id"] for d in httpx.get(f"{vllm_server}/v1/models").json()["data"]]


def test_restarted_sampler_serves_the_newest_policy_before_taking_prompts(
    kafka, topics, vllm_server, tmp_path, adapter_dir
):
    producer = Producer(kafka)
    for version in (1, 2):
        producer.send_sync(
            topics.name("policy"),
            m.validate(
                m.PolicyUpdate(version=version, adapter_uri=str(adapter_dir), base_model="b")
            ),
        )
    producer.send_sync(topics.name("prompts"), m.validate(m.Prompt(text="Hello", num_samples=1)))
    service = sampler(kafka, topics, vllm_server, tmp_path)
    with running(service):
        [group] = wait_records(kafka, topics.name("completions"), m.CompletionGroup, 1)
    assert group.message.policy_version == 2 and group.message.model == "policy-v2"


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
