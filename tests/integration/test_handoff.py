"""The merged hand-off against the real vLLM CPU server: weights reloaded in place, proven.

The session's server has LoRA and dev mode (tests/conftest.py), so these tests share it with
the adapter tests; each restores the base weights when it ends. A server without LoRA (the
merged mode's own) is what `python -m benchmarks handoff` measures.
"""

from __future__ import annotations

import math
import time

import httpx
import pytest
from _util import running, sample_value, wait_records, wait_until
from test_sampler import peft_adapter, sampler, with_readyz

from onpolicy import messages as m
from onpolicy.bus import Producer
from onpolicy_sampler.weights import BASE_LABEL, ServedWeights, weights_label
from onpolicy_trainer.merge import merge_adapter

pytestmark = pytest.mark.vllm

PROMPT = "The three primary colours are"
GREEDY = m.SamplingParams(temperature=0.0, max_tokens=12)


@pytest.fixture(scope="module")
def merged_dir(model_dir, tmp_path_factory):
    """A PEFT adapter (random, non-zero: it changes the answers) merged by the trainer's
    merge module, as the trainer stores it (merged-v1/)."""
    root = tmp_path_factory.mktemp("handoff")
    adapter = peft_adapter(model_dir, root / "policy-v1", seed=3)
    return merge_adapter(str(model_dir), adapter, root / "merged-v1")


@pytest.fixture
def server(vllm_server, model_dir):
    """The session's server, given back with the base weights (other tests expect them)."""
    yield vllm_server
    with httpx.Client(base_url=vllm_server, timeout=120) as http:
        ServedWeights(http).reload(str(model_dir), BASE_LABEL)


def weight_label(url: str) -> str:
    return httpx.get(f"{url}/weight_info", timeout=10).json()["weight_version"]


def update(version: int, folder, model_dir) -> m.PolicyUpdate:
    return m.validate(
        m.PolicyUpdate(
            version=version,
            checkpoint_uri=str(folder),
            base_model=str(model_dir),
            created_unix_ms=int(time.time() * 1000),
        )
    )


def transformers_reference(folder, prompt_ids: list[int], new_tokens: int):
    """Greedy tokens and their log-probs from ``folder`` loaded by transformers (float32)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=new_tokens, do_sample=False)
        tokens = out[0, len(prompt_ids) :].tolist()
        logits = model(out).logits[0, len(prompt_ids) - 1 : -1].float()
        logprobs = torch.log_softmax(logits, -1).gather(1, out[0, len(prompt_ids) :, None])
    return tokens, logprobs[:, 0].tolist()


def served_logprobs(url: str, ids: list[int], prompt_len: int) -> list[float]:
    """vLLM's log-probs of the given tokens (``prompt_logprobs``), those after the prompt."""
    body = httpx.post(
        f"{url}/v1/completions",
        json={
            "model": "SmolLM2-135M-Instruct",
            "prompt": ids,
            "max_tokens": 1,
            "prompt_logprobs": 0,
        },
        timeout=60,
    ).json()
    entries = body["choices"][0]["prompt_logprobs"][prompt_len:]
    return [
        next(v["logprob"] for k, v in e.items() if int(k) == t)
        for e, t in zip(entries, ids[prompt_len:], strict=True)
    ]


def test_reloaded_weights_serve_the_merged_model_and_groups_carry_the_served_version(
    kafka, topics, server, tmp_path, model_dir, merged_dir
):
    producer = Producer(kafka)
    service = sampler(kafka, topics, server, tmp_path, handoff="merged", num_samples=1)
    with running(service):
        producer.send_sync(
            topics.name("prompts"), m.Prompt(id="before", text=PROMPT, sampling=GREEDY)
        )
        wait_records(kafka, topics.name("completions"), m.CompletionGroup, 1)
        policy = update(1, merged_dir, model_dir)
        producer.send_sync(topics.name("policy"), policy)
        wait_until(lambda: service.tracker.current.version == 1, 120, "v1 reloaded")
        producer.send_sync(
            topics.name("prompts"), m.Prompt(id="after", text=PROMPT, sampling=GREEDY)
        )
        groups = {
            r.message.prompt_id: r.message
            for r in wait_records(kafka, topics.name("completions"), m.CompletionGroup, 2)
        }
    label = weights_label(1, str(merged_dir), policy.created_unix_ms)
    before, after = groups["before"], groups["after"]
    # Every group carries the version whose label vLLM reported after its request.
    assert (before.policy_version, before.model) == (0, "SmolLM2-135M-Instruct")
    assert (after.policy_version, after.model) == (1, label)
    assert weight_label(server) == label
    assert sample_value(service.metrics, "weight_reloads_total") >= 1

    # What vLLM now serves is the merged model: transformers' greedy answer and log-probs.
    prompt_ids = list(after.prompt_token_ids)
    served = list(after.completions[0].token_ids)
    tokens, reference = transformers_reference(merged_dir, prompt_ids, len(served))
    assert served[:6] == tokens[:6]  # bfloat16 on the server: near-ties may differ later
    logprobs = served_logprobs(server, prompt_ids + tokens, len(prompt_ids))
    gaps = [abs(a - b) for a, b in zip(logprobs, reference, strict=True)]
    assert max(gaps[:6]) < 0.25 and sum(gaps) / len(gaps) < 0.25, gaps
    # ... and not the base model's (the test could tell them apart).
    assert served != list(before.completions[0].token_ids)
    base_tokens, _ = transformers_reference(model_dir, prompt_ids, len(served))
    assert base_tokens[:6] == list(before.completions[0].token_ids)[:6]
    assert all(math.isfinite(x) for x in logprobs)


def test_a_failed_reload_leaves_the_replica_not_ready_and_a_later_version_loads(
    kafka, topics, server, tmp_path, model_dir, merged_dir
):
    broken = tmp_path / "merged-v1"
    broken.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (broken / name).write_bytes((merged_dir / name).read_bytes())
    (broken / "model.safetensors").write_bytes(
        (merged_dir / "model.safetensors").read_bytes()[:4096]
    )
    producer = Producer(kafka)
    producer.send_sync(topics.name("policy"), update(1, broken, model_dir))
    service = sampler(kafka, topics, server, tmp_path, handoff="merged", num_samples=1)
    with running(service), with_readyz(service) as readyz:
        # vLLM answers 500 and stays up: the folder is refused (permanent), not retried.
        wait_until(lambda: getattr(service.tracker.failure, "permanent", False), 120, "v1 refused")
        assert readyz().status_code == 503
        assert sample_value(service.metrics, "policy_load_failures_total", reason="reload") >= 1
        assert sample_value(service.metrics, "policy_load_failed") == 1
        # The base weights were restored and are labelled so: what is sampled is v0, truly.
        assert service.tracker.current.version == 0 and weight_label(server) == BASE_LABEL
        producer.send_sync(topics.name("prompts"), m.Prompt(id="p0", text=PROMPT, sampling=GREEDY))
        [first] = wait_records(kafka, topics.name("completions"), m.CompletionGroup, 1)
        assert first.message.policy_version == 0
        # A later version is not blocked by the refused one.
        good = update(2, merged_dir, model_dir)
        producer.send_sync(topics.name("policy"), good)
        wait_until(lambda: service.tracker.ready(), 120, "v2 reloaded, ready")
        assert readyz().status_code == 200
        # vLLM "restarted" (its label back to the start-up one): the tracker reloads v2, and
        # the group is stamped only once that is proven (a request that saw the start-up
        # label is retried).
        httpx.post(f"{server}/update_weight_version", json={"new_version": "default"}, timeout=10)
        producer.send_sync(topics.name("prompts"), m.Prompt(id="p2", text=PROMPT, sampling=GREEDY))
        records = wait_records(kafka, topics.name("completions"), m.CompletionGroup, 2, timeout=120)
    second = {r.message.prompt_id: r.message for r in records}["p2"]
    label = weights_label(2, str(merged_dir), good.created_unix_ms)
    assert (second.policy_version, second.model) == (2, label)
    assert weight_label(server) == label
    # v2's reload and the repair (noticed by the worker after its request, or by the
    # tracker's own check every 5 s, whichever came first).
    assert sample_value(service.metrics, "weight_reloads_total") >= 2
