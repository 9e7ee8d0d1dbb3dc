"""The sampler's policy checks without a server: adapter names by content, rank and base-model
checks, vLLM's LoRA API proven through /v1/models (a fake vLLM on httpx's mock transport), and
the tracker's retry/refusal state machine."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest

from onpolicy import messages as m
from onpolicy.serde import encode
from onpolicy.settings import KafkaSettings
from onpolicy.telemetry import Metrics
from onpolicy_sampler.adapters import (
    Backoff,
    LoadFailure,
    adapter_config,
    adapter_rank,
    check_rank,
    content_digest,
    fetch_adapter,
    same_base_model,
    uri_allowed,
)
from onpolicy_sampler.policy import PolicyTracker
from onpolicy_sampler.served import ServedModels

BASE = "SmolLM2-135M-Instruct"
BASE_ROOT = "/models/SmolLM2-135M-Instruct"


def make_adapter(folder: Path, r: int = 8, weights: bytes = b"w1", **config) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text(json.dumps({"r": r, **config}))
    (folder / "adapter_model.safetensors").write_bytes(weights)
    return folder


def test_digest_follows_the_adapter_files_not_the_bookkeeping(tmp_path: Path) -> None:
    a = make_adapter(tmp_path / "a")
    b = make_adapter(tmp_path / "b")
    assert content_digest(a) == content_digest(b)  # same files, other folder
    (b / "round.json").write_text('{"created_unix_ms": 1}')
    (b / "README.md").write_text("model card")
    assert content_digest(a) == content_digest(b)
    c = make_adapter(tmp_path / "c", weights=b"w2")
    assert content_digest(c) != content_digest(a)
    d = make_adapter(tmp_path / "d", r=4)
    assert content_digest(d) != content_digest(a)
    assert len(content_digest(a)) == 10


def test_rank_is_the_largest_of_r_and_rank_pattern(tmp_path: Path) -> None:
    assert adapter_rank({"r": 8}) == 8
    assert adapter_rank({"r": 8, "rank_pattern": {"q_proj": 32}}) == 32
    check_rank({"r": 16}, 16, "x")
    with pytest.raises(LoadFailure) as err:
        check_rank({"r": 32}, 16, "/ckpt/policy-v3")
    assert err.value.permanent and err.value.reason == "rank"
    assert "32" in str(err.value) and "16" in str(err.value)
    (tmp_path / "adapter_config.json").write_text("{not json")
    with pytest.raises(LoadFailure) as err:
        adapter_config(tmp_path)
    assert err.value.permanent and err.value.reason == "bad_adapter"


def test_fetch_missing_folder_is_transient_remote_is_cached_per_uri(tmp_path: Path) -> None:
    with pytest.raises(LoadFailure) as err:
        fetch_adapter(str(tmp_path / "not-yet"), tmp_path / "cache")
    assert not err.value.permanent and err.value.reason == "fetch"
    local = make_adapter(tmp_path / "policy-v1")
    assert fetch_adapter(f"file://{local}", tmp_path / "cache") == local
    # A remote filesystem (fsspec's memory://): two lineages' "policy-v1" never share a copy.
    import fsspec

    fs = fsspec.filesystem("memory")
    for run, weights in (("run-a", b"A"), ("run-b", b"B")):
        fs.pipe(f"/{run}/policy-v1/adapter_config.json", b'{"r": 8}')
        fs.pipe(f"/{run}/policy-v1/adapter_model.safetensors", weights)
    got_a = fetch_adapter("memory://run-a/policy-v1", tmp_path / "cache")
    got_b = fetch_adapter("memory://run-b/policy-v1", tmp_path / "cache")
    assert got_a != got_b
    assert (got_a / "adapter_model.safetensors").read_bytes() == b"A"
    assert (got_b / "adapter_model.safetensors").read_bytes() == b"B"
    with pytest.raises(LoadFailure) as err:
        fetch_adapter("memory://run-c/policy-v1", tmp_path / "cache")
    assert not err.value.permanent and err.value.reason == "fetch"


def test_base_model_match() -> None:
    served = {BASE, BASE_ROOT}
    assert same_base_model("", served)  # older trainers: not checked
    assert same_base_model(BASE_ROOT, served)
    assert same_base_model("/home/me/.cache/onpolicy/models/SmolLM2-135M-Instruct/", served)
    assert same_base_model("HuggingFaceTB/SmolLM2-135M-Instruct", served)
    assert not same_base_model("/models/Qwen3-0.6B", served)
    assert same_base_model(
        "HuggingFaceTB/SmolLM2-1.7B-Instruct",
        {"policy-base", "HuggingFaceTB/SmolLM2-1.7B-Instruct"},
    )


def test_backoff_grows_to_its_cap_and_resets() -> None:
    b = Backoff(0.5, 4.0)
    delays = [b.next_delay() for _ in range(6)]
    assert 0.45 <= delays[0] <= 0.55 and delays[1] > delays[0]
    assert all(d <= 4.4 for d in delays) and delays[-1] >= 3.6
    b.reset()
    assert b.next_delay() <= 0.55


class FakeVllm:
    """vLLM 0.32's LoRA API as the field notes describe it (400 'already loaded' for any
    known name, whatever the path; /v1/models lists adapters with root = path)."""

    def __init__(self, max_rank: int = 16):
        self.adapters: dict[str, str] = {}
        self.max_rank = max_rank
        self.down = False
        self.healthy = True
        self.calls: list[str] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if self.down:
            raise httpx.ConnectError("connection refused", request=request)
        path = request.url.path
        self.calls.append(path)
        if path == "/health":
            return httpx.Response(200 if self.healthy else 503)
        if path == "/v1/models":
            data = [{"id": BASE, "root": BASE_ROOT, "parent": None}] + [
                {"id": n, "root": p, "parent": BASE} for n, p in self.adapters.items()
            ]
            return httpx.Response(200, json={"object": "list", "data": data})
        body = json.loads(request.content)
        if path == "/v1/load_lora_adapter":
            name, where = body["lora_name"], body["lora_path"]
            if name in self.adapters:
                return httpx.Response(
                    400,
                    json={
                        "error": {"message": f"The lora adapter '{name}' has already been loaded."}
                    },
                )
            config = json.loads(Path(where, "adapter_config.json").read_text())
            if config["r"] > self.max_rank:
                # What vLLM 0.32 answers when its engine rejects an adapter.
                message = f"LoRA rank {config['r']} is greater than max_lora_rank {self.max_rank}."
                return httpx.Response(500, json={"error": {"message": message}})
            self.adapters[name] = where
            return httpx.Response(200, text="ok")
        if path == "/v1/unload_lora_adapter":
            if self.adapters.pop(body["lora_name"], None) is None:
                return httpx.Response(404, json={"error": {"message": "not found"}})
            return httpx.Response(200, text="ok")
        return httpx.Response(404)


def served(fake: FakeVllm) -> ServedModels:
    return ServedModels(httpx.Client(base_url="http://vllm", transport=httpx.MockTransport(fake)))


def test_already_loaded_counts_only_with_the_same_root(tmp_path: Path) -> None:
    fake = FakeVllm()
    api = served(fake)
    ours = str(make_adapter(tmp_path / "ours"))
    theirs = str(make_adapter(tmp_path / "theirs"))
    fake.adapters["policy-v2-abc"] = theirs  # another run's adapter under the same name
    assert api.ensure("policy-v2-abc", ours) == "reloaded"
    assert fake.adapters["policy-v2-abc"] == ours
    assert "/v1/unload_lora_adapter" in fake.calls
    assert api.ensure("policy-v2-abc", ours) == "verified"
    assert api.ensure("policy-v3-def", ours) == "loaded"


def test_refusal_is_permanent_and_vllm_down_is_transient(tmp_path: Path) -> None:
    fake = FakeVllm(max_rank=16)
    api = served(fake)
    big = str(make_adapter(tmp_path / "big", r=32))
    with pytest.raises(LoadFailure) as err:
        api.ensure("policy-v1-x", big)
    assert err.value.permanent and err.value.reason == "vllm_refused"
    assert "greater than max_lora_rank 16" in str(err.value)
    fake.healthy = False  # a 500 from a server that is not healthy: retry
    with pytest.raises(LoadFailure) as err:
        api.ensure("policy-v1-x", big)
    assert not err.value.permanent and err.value.reason == "vllm_unavailable"
    fake.down = True
    with pytest.raises(LoadFailure) as err:
        api.ensure("policy-v1-x", big)
    assert not err.value.permanent and err.value.reason == "vllm_unavailable"


def tracker_on(fake: FakeVllm, tmp_path: Path, **kw) -> PolicyTracker:
    tracker = PolicyTracker(
        kafka=KafkaSettings(),
        topic="t.policy",
        dead_letter_topic="t.dlq",
        vllm_url="http://vllm",
        base_model=BASE,
        keep_adapters=2,
        cache_dir=tmp_path / "cache",
        metrics=Metrics("sampler"),
        producer=None,  # type: ignore[arg-type]
        retry_initial_s=0.01,
        retry_max_s=0.05,
        **kw,
    )
    tracker.http = httpx.Client(base_url="http://vllm", transport=httpx.MockTransport(fake))
    tracker.served = ServedModels(tracker.http)
    tracker.caught_up.set()
    return tracker


def update(version: int, path: Path | str, base: str = BASE_ROOT, **kw) -> m.PolicyUpdate:
    return m.validate(m.PolicyUpdate(version=version, adapter_uri=str(path), base_model=base, **kw))


def failures(tracker: PolicyTracker, reason: str) -> float:
    return tracker.m_failures.labels(reason)._value.get()


def offer(tracker: PolicyTracker, u: m.PolicyUpdate) -> None:
    """The update as the policy thread reads it from the topic."""
    value, headers = encode(u)
    tracker._handle(
        SimpleNamespace(topic="t.policy", partition=0, offset=0, value=value, headers=headers)
    )


def test_tracker_retries_a_missing_adapter_without_skipping_it(tmp_path: Path) -> None:
    fake = FakeVllm()
    tracker = tracker_on(fake, tmp_path)
    folder = tmp_path / "policy-v1"
    offer(tracker, update(1, folder))
    tracker._attempt()
    assert not tracker.ready() and tracker.failure.reason == "fetch"
    assert not tracker.failure.permanent and tracker._pending is not None
    tracker._attempt()
    assert tracker.failure.attempts == 2 and failures(tracker, "fetch") == 2
    make_adapter(folder)
    tracker._attempt()
    assert tracker.ready() and tracker.current.version == 1
    assert tracker.current.model == f"policy-v1-{content_digest(folder)}"
    assert fake.adapters[tracker.current.model] == str(folder)
    assert tracker.m_failed._value.get() == 0


def test_tracker_refusals_make_it_not_ready_and_a_later_version_recovers(
    tmp_path: Path,
) -> None:
    fake = FakeVllm()
    tracker = tracker_on(fake, tmp_path, max_lora_rank=16)
    offer(tracker, update(1, make_adapter(tmp_path / "v1")))
    tracker._attempt()
    assert tracker.ready() and tracker.current.version == 1
    # Rank above the maximum: refused on the sampler's side, vLLM never asked.
    offer(tracker, update(2, make_adapter(tmp_path / "v2", r=32)))
    loads = fake.calls.count("/v1/load_lora_adapter")
    tracker._attempt()
    assert fake.calls.count("/v1/load_lora_adapter") == loads
    assert not tracker.ready() and tracker.failure.reason == "rank"
    assert tracker._pending is None and tracker.current.version == 1  # given up, not retried
    # Another base model, then a full checkpoint: refused too.
    offer(tracker, update(3, make_adapter(tmp_path / "v3", weights=b"3"), base="/models/Other"))
    tracker._attempt()
    assert tracker.failure.reason == "base_model" and tracker.failure.version == 3
    offer(
        tracker, m.validate(m.PolicyUpdate(version=4, checkpoint_uri="/ckpt/v4", base_model=BASE))
    )
    tracker._attempt()
    assert tracker.failure.reason == "full_checkpoint" and not tracker.ready()
    assert [failures(tracker, r) for r in ("rank", "base_model", "full_checkpoint")] == [1, 1, 1]
    # A later good version loads and readiness returns.
    offer(tracker, update(5, make_adapter(tmp_path / "v5", weights=b"5")))
    tracker._attempt()
    assert tracker.ready() and tracker.current.version == 5 and tracker.failure is None


def test_tracker_vllm_down_is_retried_and_a_newer_version_replaces_the_pending_one(
    tmp_path: Path,
) -> None:
    fake = FakeVllm()
    tracker = tracker_on(fake, tmp_path)
    fake.down = True
    offer(tracker, update(1, make_adapter(tmp_path / "v1")))
    tracker._attempt()
    assert tracker.failure.reason == "vllm_unavailable" and tracker._pending.version == 1
    offer(tracker, update(2, make_adapter(tmp_path / "v2", weights=b"2")))
    assert tracker._pending.version == 2 and tracker._backoff.attempts == 0
    offer(tracker, update(1, tmp_path / "v1"))  # an older one never replaces it
    assert tracker._pending.version == 2
    fake.down = False
    tracker._attempt()
    assert tracker.ready() and tracker.current.version == 2


def test_two_lineages_same_version_get_different_names(tmp_path: Path) -> None:
    fake = FakeVllm()
    one, two = tracker_on(fake, tmp_path), tracker_on(fake, tmp_path)
    offer(one, update(1, make_adapter(tmp_path / "run-a" / "policy-v1", weights=b"A")))
    offer(two, update(1, make_adapter(tmp_path / "run-b" / "policy-v1", weights=b"B")))
    one._attempt()
    two._attempt()
    assert one.current.model != two.current.model
    assert fake.adapters[one.current.model].endswith("run-a/policy-v1")
    assert fake.adapters[two.current.model].endswith("run-b/policy-v1")


def test_adapters_load_only_from_the_checkpoint_store(tmp_path: Path) -> None:
    store = tmp_path / "store"
    assert uri_allowed(str(store / "policy-v1"), [str(store)])
    assert uri_allowed(f"file://{store}/policy-v1", [f"{store}/"])
    assert not uri_allowed(str(store / ".." / "elsewhere"), [str(store)])  # no climbing out
    assert not uri_allowed("/etc/passwd", [str(store)])
    assert uri_allowed("s3://bucket/run/policy-v1", ["s3://bucket/run"])
    assert not uri_allowed("s3://bucket/run-other/policy-v1", ["s3://bucket/run"])
    assert not uri_allowed("gs://bucket/run/policy-v1", ["s3://bucket/run"])
    assert not uri_allowed("http://evil.example/adapter", [str(store)])

    fake = FakeVllm()
    tracker = tracker_on(fake, tmp_path, adapter_uri_prefixes=[str(store)])
    offer(tracker, update(1, make_adapter(tmp_path / "outside")))
    tracker._attempt()
    assert tracker.failure.reason == "uri_not_allowed" and not tracker.ready()
    assert "/v1/load_lora_adapter" not in fake.calls  # vLLM never asked
    offer(tracker, update(2, make_adapter(store / "policy-v2")))
    tracker._attempt()
    assert tracker.ready() and tracker.current.version == 2
