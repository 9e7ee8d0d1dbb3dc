"""The merged hand-off's pieces without a server: labels, the request gate, the store's merged
folders, the PolicyUpdate that names them, and how the stack launches vLLM per mode."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import pytest

from onpolicy.stack.settings import StackSettings
from onpolicy.stack.vllm import handoff_args, handoff_env
from onpolicy_sampler.policy import Policy
from onpolicy_sampler.weights import WeightGate, label_version, weights_label
from onpolicy_trainer.rounds import policy_update
from onpolicy_trainer.store import CheckpointStore


def test_labels_name_version_and_lineage():
    a = weights_label(3, "/ckpt/run-a/merged-v3", 1000)
    b = weights_label(3, "/ckpt/run-b/merged-v3", 1000)
    assert a.startswith("policy-v3-") and a != b  # same version, other run: other label
    assert weights_label(3, "/x", 1) != weights_label(3, "/x", 2)  # republished: other label
    assert [label_version(x) for x in (a, "default", "base", "unknown", "x-v")] == [
        3,
        0,
        0,
        None,
        None,
    ]
    assert label_version(weights_label(12, "/x", 1, prefix="run-7-policy")) == 12


def test_a_policy_is_proven_only_by_its_own_label():
    base = Policy(0, "m")
    v1 = Policy(1, "m", "/ckpt/merged-v1", weights_label(1, "/ckpt/merged-v1", 5))
    assert base.proven_by("default") and base.proven_by("base")
    assert not base.proven_by(v1.label) and not base.proven_by("unknown")
    assert v1.proven_by(v1.label)
    assert not v1.proven_by("default")  # vLLM restarted: its start-up weights, not v1's
    assert not v1.proven_by(weights_label(1, "/other/merged-v1", 5))


def test_the_gate_drains_requests_before_a_reload_and_holds_new_ones():
    gate = WeightGate()
    events: list[str] = []

    async def request(name: str, hold: float):
        async with gate.request():
            events.append(f"{name} start")
            await asyncio.sleep(hold)
            events.append(f"{name} end")

    def reload():
        time.sleep(0.1)  # r1 is in flight
        with gate.swap(timeout_s=10):
            events.append("reload")
            time.sleep(0.2)

    async def main():
        thread = threading.Thread(target=reload)
        first = asyncio.create_task(request("r1", 0.4))
        thread.start()
        await asyncio.sleep(0.2)  # the gate is closed now: r2 waits for the reload
        await request("r2", 0)
        await first
        thread.join()

    asyncio.run(main())
    assert events == ["r1 start", "r1 end", "reload", "r2 start", "r2 end"]
    assert not gate.closed


def test_a_failed_swap_leaves_the_gate_closed():
    gate = WeightGate()
    with pytest.raises(RuntimeError), gate.swap(timeout_s=1):
        raise RuntimeError("reload failed")
    assert gate.closed  # nothing is sampled on unknown weights
    gate.open()
    assert not gate.closed


def test_merged_folders_are_stored_and_pruned_while_adapters_and_datasets_stay(tmp_path):
    store = CheckpointStore(str(tmp_path / "ckpt"))
    for version in (1, 2, 3):
        merged = tmp_path / f"m{version}"
        merged.mkdir()
        (merged / "config.json").write_text("{}")
        (merged / "model.safetensors").write_bytes(b"w" * version)
        uri = store.save_merged(version, merged)
        assert uri == str(tmp_path / "ckpt" / f"merged-v{version}")
        (tmp_path / "ckpt" / f"policy-v{version}").mkdir()
        (tmp_path / "ckpt" / "datasets").mkdir(exist_ok=True)
        (tmp_path / "ckpt" / "datasets" / f"round-{version}.parquet").write_bytes(b"")
    assert store.prune_merged(keep=2) == [1]
    names = sorted(p.name for p in (tmp_path / "ckpt").iterdir() if not p.name.startswith("."))
    assert names == ["datasets", "merged-v2", "merged-v3", "policy-v1", "policy-v2", "policy-v3"]
    assert len(list((tmp_path / "ckpt" / "datasets").iterdir())) == 3
    assert store.prune_merged(keep=2) == []


def test_the_policy_update_names_the_merged_folder_beside_the_adapter(tmp_path):
    from onpolicy_trainer.store import SavedRound

    meta = {"base_model": "b", "merged_uri": "/ckpt/merged-v2", "created_unix_ms": 7}
    update = policy_update(SavedRound(2, "/ckpt/policy-v2", "/ckpt/datasets/round-2", meta))
    assert (update.adapter_uri, update.checkpoint_uri) == ("/ckpt/policy-v2", "/ckpt/merged-v2")
    lora = policy_update(SavedRound(2, "/ckpt/policy-v2", "d", {"base_model": "b"}))
    assert (lora.adapter_uri, lora.checkpoint_uri) == ("/ckpt/policy-v2", "")
    full = policy_update(SavedRound(2, "/ckpt/policy-v2", "d", {"full_finetune": True}))
    assert (full.adapter_uri, full.checkpoint_uri) == ("", "/ckpt/policy-v2")
    json.dumps(meta)


def test_the_stack_starts_vllm_for_its_handoff_mode():
    merged = StackSettings(handoff="merged")
    assert handoff_args(merged) == []
    assert handoff_env(merged) == {"VLLM_SERVER_DEV_MODE": "1"}
    lora = StackSettings(handoff="lora", max_lora_rank=32)
    assert handoff_args(lora) == ["--enable-lora", "--max-lora-rank", "32", "--max-loras", "4"]
    assert handoff_env(lora) == {"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"}
    both = StackSettings(handoff="lora", vllm_dev_mode=True)  # the tests' shared server
    assert handoff_env(both)["VLLM_SERVER_DEV_MODE"] == "1"
