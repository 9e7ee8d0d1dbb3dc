"""Large-model settings: what they become in TRL's DPOConfig and accelerate's FSDP plugin,
the refusals that name the field, and the memory arithmetic behind the README's table."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from onpolicy.settings import ConfigError, load_settings
from onpolicy_trainer import memory
from onpolicy_trainer.dpo import dpo_args
from onpolicy_trainer.settings import TrainerSettings


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for var in list(os.environ):
        if var.startswith("ONPOLICY_"):
            monkeypatch.delenv(var)


def _config(tmp_path: Path, **values):
    """The DPOConfig the trainer builds for these settings (on this CPU machine)."""
    from trl import DPOConfig

    settings = TrainerSettings(model="m", **values)
    return DPOConfig(**dpo_args(settings, tmp_path, bf16=bool(settings.bf16), cpu=True))


def test_fsdp_becomes_accelerates_fsdp2_plugin_full_shard(tmp_path: Path) -> None:
    from accelerate.utils import FullyShardedDataParallelPlugin

    config = _config(tmp_path, distributed="fsdp", train_processes=2, gradient_checkpointing=True)
    assert config.fsdp is True
    plugin = FullyShardedDataParallelPlugin(**config.fsdp_plugin_args)
    assert plugin.fsdp_version == 2
    assert plugin.reshard_after_forward is True  # FSDP2's full shard (ZeRO-3)
    assert plugin.auto_wrap_policy is not None  # one unit per decoder layer
    assert plugin.activation_checkpointing is True  # FSDP's own, not the Trainer's
    assert not config.activation_checkpointing
    assert type(plugin.cpu_offload).__name__ == "OffloadPolicy"  # FSDP2's: nothing offloaded
    assert "FULL_STATE_DICT" in str(plugin.state_dict_type)


def test_fsdp1_and_offload_map_to_their_plugin_fields(tmp_path: Path) -> None:
    from accelerate.utils import FullyShardedDataParallelPlugin

    config = _config(
        tmp_path,
        distributed="fsdp",
        train_processes=2,
        fsdp_version=1,
        fsdp_cpu_offload=True,
        gradient_checkpointing=False,
    )
    plugin = FullyShardedDataParallelPlugin(**config.fsdp_plugin_args)
    assert plugin.fsdp_version == 1
    assert "FULL_SHARD" in str(plugin.reshard_after_forward)
    assert plugin.cpu_offload.offload_params is True
    assert plugin.activation_checkpointing is False


def test_ddp_keeps_no_fsdp_and_checkpoints_through_the_trainer(tmp_path: Path) -> None:
    config = _config(tmp_path)  # on by default, as TRL's DPOConfig has it
    assert not config.fsdp and config.fsdp_plugin_args is None
    assert config.activation_checkpointing is True
    off = _config(tmp_path, gradient_checkpointing=False)
    assert off.activation_checkpointing is False and not off.precompute_ref_log_probs
    fsdp_off = _config(
        tmp_path, distributed="fsdp", train_processes=2, gradient_checkpointing=False
    )
    assert fsdp_off.fsdp_config["activation_checkpointing"] is False


def test_bf16_and_the_precomputed_reference_reach_dpoconfig(tmp_path: Path) -> None:
    config = _config(tmp_path, full_finetune=True, precompute_ref_log_probs=True, bf16=True)
    assert config.bf16 is True and config.precompute_ref_log_probs is True
    assert _config(tmp_path).bf16 is False  # none: where the GPU supports it; no GPU here


@pytest.mark.parametrize(
    ("values", "names"),
    [
        ({"distributed": "fsdp", "train_processes": 1}, ["train_processes", "distributed"]),
        ({"fsdp_cpu_offload": True}, ["fsdp_cpu_offload", "ONPOLICY_TRAINER_DISTRIBUTED"]),
        ({"precompute_ref_log_probs": True}, ["precompute_ref_log_probs", "full_finetune"]),
        ({"nnodes": 2}, ["nnodes (2)", "rdzv_endpoint"]),
        (
            {"nnodes": 2, "rdzv_endpoint": "t-0:29400", "train_processes": 1},
            ["nnodes", "train_processes"],
        ),
        ({"fsdp_version": 3}, ["fsdp_version"]),
        ({"distributed": "zero3"}, ["distributed"]),
    ],
)
def test_refusals_name_the_field(values: dict, names: list[str]) -> None:
    with pytest.raises(ConfigError) as err:
        load_settings(TrainerSettings, model="m", **values)
    for name in names:
        assert name in str(err.value)


def test_fsdp_settings_that_fit_are_accepted() -> None:
    settings = load_settings(
        TrainerSettings,
        model="m",
        distributed="fsdp",
        train_processes=0,
        nnodes=2,
        rdzv_endpoint="trainer-0.trainer-ranks:29400",
        full_finetune=True,
        precompute_ref_log_probs=True,
        gradient_checkpointing=True,
    )
    assert (settings.distributed, settings.nnodes, settings.fsdp_version) == ("fsdp", 2, 2)


# --- memory.py -------------------------------------------------------------------------------


def test_the_default_models_shape_is_its_local_config_and_counts_its_real_parameters() -> None:
    from safetensors import safe_open

    folder = Path(TrainerSettings().model)
    if not (folder / "config.json").exists():
        pytest.skip("the default model is not prepared (make prepare)")
    config = json.loads((folder / "config.json").read_text())
    shape = memory.SMOLLM2_135M
    for field in (
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "intermediate_size",
        "vocab_size",
        "tie_word_embeddings",
        "head_dim",
    ):
        assert getattr(shape, field) == config[field], field
    with safe_open(str(folder / "model.safetensors"), "pt") as weights:
        real = 0
        for key in weights.keys():  # noqa: SIM118 (safe_open has no __iter__)
            dims = weights.get_slice(key).get_shape()
            count = 1
            for dim in dims:
                count *= dim
            real += count
    assert shape.params() == real == 134_515_008


@pytest.mark.parametrize(
    ("shape", "published"),
    [
        (memory.SMOLLM2_1_7B, 1.71e9),
        (memory.MISTRAL_7B, 7.24e9),
        (memory.LLAMA_3_1_8B, 8.03e9),
        (memory.LLAMA_3_1_70B, 70.55e9),
    ],
)
def test_parameter_counts_match_the_published_sizes(shape, published: float) -> None:
    assert shape.params() == pytest.approx(published, rel=0.005)


def test_llama_8b_layer_arithmetic_by_hand() -> None:
    s = memory.LLAMA_3_1_8B
    # q 4096x4096, k and v 4096x1024, o 4096x4096, MLP 3 x 4096x14336, two norms
    assert s.layer_params() == 2 * 4096 * 4096 + 2 * 4096 * 1024 + 3 * 4096 * 14336 + 2 * 4096
    assert s.root_params() == 2 * 128256 * 4096 + 4096  # untied embeddings and LM head
    # LoRA r=8 on q,k,v,o: r x (in + out) per projection per layer
    assert s.lora_params(8, ("q_proj", "k_proj", "v_proj", "o_proj")) == 32 * 8 * (
        (4096 + 4096) + 2 * (4096 + 1024) + (4096 + 4096)
    )
    assert s.activation_bytes_per_token_layer() == 10 * 4096 + 4 * 8 * 128 + 8 * 14336


def test_fsdp_divides_the_states_and_ddp_does_not() -> None:
    s = memory.LLAMA_3_1_8B
    shape = memory.Shape(gradient_checkpointing=True)
    one = memory.per_gpu_bytes(s, "fsdp-full", 1, shape)
    eight = memory.per_gpu_bytes(s, "fsdp-full", 8, shape)
    assert eight["trainable_states"] == pytest.approx(one["trainable_states"] / 8)
    assert one["trainable_states"] == s.params() * 16  # fp32 weight + grad + AdamW m, v
    assert eight["reference"] == pytest.approx(s.params() * 2 / 8)  # sharded bf16 copy
    ddp = memory.per_gpu_bytes(s, "ddp-full", 8, shape)
    assert ddp["trainable_states"] == one["trainable_states"]
    assert ddp["ddp_buckets"] == s.params() * 4
    lora = memory.per_gpu_bytes(s, "ddp-lora", 1, shape)
    assert lora["reference"] == 0 and lora["weights"] == s.params() * 2
    pre = memory.per_gpu_bytes(
        s, "fsdp-full", 8, memory.Shape(gradient_checkpointing=True, precompute_ref_log_probs=True)
    )
    assert pre["reference"] == 0 and pre["total"] < eight["total"]


def test_checkpointing_keeps_only_layer_inputs() -> None:
    s = memory.LLAMA_3_1_8B
    full = memory.per_gpu_bytes(s, "ddp-lora", 1, memory.Shape())["activations"]
    gc = memory.per_gpu_bytes(s, "ddp-lora", 1, memory.Shape(gradient_checkpointing=True))
    tokens = 2 * 4 * 1024
    assert full == 32 * s.activation_bytes_per_token_layer() * tokens
    assert gc["activations"] == 32 * 2 * 4096 * tokens + s.activation_bytes_per_token_layer() * (
        tokens
    )


def test_the_table_says_what_fits() -> None:
    shape = memory.Shape()
    gc = memory.Shape(gradient_checkpointing=True)
    # 8B full fine-tuning: 16 B/param is 128 GB, more than one 80 GB GPU: DDP never fits.
    assert memory.min_gpus(memory.LLAMA_3_1_8B, "ddp-full", gc) is None
    assert memory.min_gpus(memory.LLAMA_3_1_8B, "fsdp-full", gc) == 4
    assert memory.min_gpus(memory.LLAMA_3_1_70B, "fsdp-full", gc) == 32
    assert memory.min_gpus(memory.LLAMA_3_1_70B, "fsdp-lora", gc) == 4
    assert memory.min_gpus(memory.LLAMA_3_1_70B, "ddp-lora", gc) is None
    assert memory.min_gpus(memory.SMOLLM2_135M, "ddp-full", shape) == 1
    table = memory.table()
    assert table.count("\n") == 1 + len(memory.MODELS)
    assert "| Llama-3.1-70B | 70.55B |" in table


def test_one_node_runs_standalone_and_several_join_a_c10d_rendezvous() -> None:
    from onpolicy_trainer import launch

    one = TrainerSettings(model="m", train_processes=2, distributed="fsdp")
    command = launch.torchrun_command(one, 2, "/job")
    assert "--standalone" in command and command[-2:] == ["onpolicy_trainer.launch", "/job"]
    many = TrainerSettings(model="m", nnodes=3, rdzv_endpoint="t-0.ranks:29400", rdzv_id="r")
    service = launch.torchrun_command(many, 8, "/job")
    worker = launch.torchrun_command(many, 8, "--worker")
    for command in (service, worker):
        assert "--standalone" not in command
        assert {"--nnodes=3", "--rdzv-backend=c10d", "--rdzv-endpoint=t-0.ranks:29400"} <= set(
            command
        )
        assert "--rdzv-id=r" in command and "--nproc-per-node=8" in command
    assert "--rdzv-conf=is_host=true" in service and "--rdzv-conf=is_host=false" in worker
    # One GPU per node still trains under torchrun: the ranks span the nodes.
    one_gpu = TrainerSettings(model="m", nnodes=2, rdzv_endpoint="t-0:29400", train_processes=0)
    assert launch.train_fn(one_gpu) is launch.train_round_distributed


def test_the_adapter_saved_from_a_gathered_state_dict_is_the_one_peft_saves(tmp_path: Path) -> None:
    """FSDP: rank 0 saves the adapter from the gathered full state dict (dpo.py); the files
    hold exactly what PEFT's own save_pretrained writes for the same model."""
    import torch
    from peft import get_peft_model
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from onpolicy_trainer.dpo import _save_gathered_adapter, lora_config

    settings = TrainerSettings()
    if not (Path(settings.model) / "config.json").exists():
        pytest.skip("the default model is not prepared (make prepare)")
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(settings.model), lora_config(settings)
    )
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_()  # PEFT starts B at zero: make the comparison mean something
    _save_gathered_adapter(model, model.state_dict(), tmp_path / "ours")
    model.save_pretrained(tmp_path / "peft", selected_adapters=["default"])
    ours = load_file(str(tmp_path / "ours" / "adapter_model.safetensors"))
    theirs = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    assert ours.keys() == theirs.keys() and len(ours) == 30 * 4 * 2
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    ours_config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    theirs_config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    # target_modules is a set in PEFT: its saved order is the set's, which a copy may change.
    for config in (ours_config, theirs_config):
        config["target_modules"] = sorted(config["target_modules"])
    assert ours_config == theirs_config
