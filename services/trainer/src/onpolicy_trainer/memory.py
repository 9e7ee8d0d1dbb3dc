"""How much GPU memory a DPO round needs per GPU, and which model fits how many GPUs.

Worked out from the model's shape (nothing is downloaded: the configs below are written in
as constants, from each model's published ``config.json``) and the training mode:

* weights: trainable ones as fp32 master weights (4 B/param), frozen ones (a LoRA's base, a
  DPO reference copy) in bf16 (2 B/param);
* gradients: fp32 (4 B per trainable param); DDP adds its fp32 all-reduce buckets (4 B);
* AdamW: two fp32 states (8 B per trainable param). So 16 B per trainable parameter, the
  usual mixed-precision accounting (ZeRO paper), 12 B of it in the optimizer's hands;
* FSDP (full shard) divides weights, gradients and optimizer states by the GPU count, and
  adds the gathered bf16 copy of the units in flight: two decoder layers (the one computing,
  the one prefetched) and the root unit (embeddings, LM head, final norm);
* the DPO reference: a LoRA's is the base with the adapter disabled (nothing extra); full
  fine-tuning keeps a frozen bf16 copy (sharded like the policy under FSDP) unless the
  reference log-probs are precomputed;
* activations (bf16, SDPA/flash attention: no s x s scores kept) per token per decoder layer,
  for a Llama-style block with grouped-query attention and a SwiGLU MLP:
  ``10 h + 4 kv_heads head_dim + 8 intermediate`` bytes (the tensors autograd keeps: norm
  inputs and outputs, q/k/v, attention output, gate/up/activation/product); with gradient
  checkpointing only each layer's input (2 h bytes) is kept, plus one layer's full set being
  recomputed. A step holds ``2 x per_device_batch_size x max_length`` tokens (DPO runs the
  chosen and the rejected answer of every pair). TRL 1.16 computes the log-probs in chunks
  without materialising the full logits (its fused LM head), so logits are not counted;
* overhead: 3 GiB per GPU (CUDA context, NCCL buffers) and 10 % of the GPU kept free for the
  allocator's fragmentation.

It is an estimate, not a measurement: ``python -m onpolicy_trainer.memory`` prints the
table in the trainer's README.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Literal

GiB = 1024**3


@dataclass(frozen=True)
class ModelShape:
    """The fields of a Llama-style ``config.json`` that fix its parameter count."""

    name: str
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    vocab_size: int
    tie_word_embeddings: bool
    head_dim: int | None = None

    @property
    def head(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    def layer_params(self) -> int:
        h, d = self.hidden_size, self.head
        q = h * self.num_attention_heads * d
        kv = 2 * h * self.num_key_value_heads * d
        o = self.num_attention_heads * d * h
        mlp = 3 * h * self.intermediate_size
        return q + kv + o + mlp + 2 * h  # two RMSNorm weights

    def root_params(self) -> int:
        """Embeddings, LM head (unless tied) and the final norm: FSDP's root unit."""
        embed = self.vocab_size * self.hidden_size
        return embed * (1 if self.tie_word_embeddings else 2) + self.hidden_size

    def params(self) -> int:
        return self.num_hidden_layers * self.layer_params() + self.root_params()

    def lora_params(self, r: int, targets: tuple[str, ...]) -> int:
        h, d = self.hidden_size, self.head
        shapes = {  # (in, out) of each projection
            "q_proj": (h, self.num_attention_heads * d),
            "k_proj": (h, self.num_key_value_heads * d),
            "v_proj": (h, self.num_key_value_heads * d),
            "o_proj": (self.num_attention_heads * d, h),
            "gate_proj": (h, self.intermediate_size),
            "up_proj": (h, self.intermediate_size),
            "down_proj": (self.intermediate_size, h),
        }
        per_layer = sum(r * (shapes[t][0] + shapes[t][1]) for t in targets)
        return self.num_hidden_layers * per_layer

    def activation_bytes_per_token_layer(self) -> int:
        h = self.hidden_size
        return 10 * h + 4 * self.num_key_value_heads * self.head + 8 * self.intermediate_size


# From each model's published config.json (the Hub cannot be reached from here: constants).
SMOLLM2_135M = ModelShape(
    "SmolLM2-135M", 576, 30, 9, 3, 1536, 49152, tie_word_embeddings=True, head_dim=64
)
SMOLLM2_1_7B = ModelShape("SmolLM2-1.7B", 2048, 24, 32, 32, 8192, 49152, tie_word_embeddings=True)
MISTRAL_7B = ModelShape("Mistral-7B-v0.1", 4096, 32, 32, 8, 14336, 32000, tie_word_embeddings=False)
LLAMA_3_1_8B = ModelShape("Llama-3.1-8B", 4096, 32, 32, 8, 14336, 128256, tie_word_embeddings=False)
LLAMA_3_1_70B = ModelShape(
    "Llama-3.1-70B", 8192, 80, 64, 8, 28672, 128256, tie_word_embeddings=False
)
MODELS = (SMOLLM2_135M, SMOLLM2_1_7B, MISTRAL_7B, LLAMA_3_1_8B, LLAMA_3_1_70B)

Mode = Literal["ddp-full", "fsdp-full", "ddp-lora", "fsdp-lora"]
MODES: tuple[Mode, ...] = ("ddp-full", "fsdp-full", "ddp-lora", "fsdp-lora")

TRAINABLE_BYTES = 4 + 4 + 8  # fp32 master weight, fp32 gradient, AdamW m and v (fp32)
DDP_BUCKET_BYTES = 4  # DDP's fp32 gradient buckets
FROZEN_BYTES = 2  # bf16
OVERHEAD_BYTES = 3 * GiB
FREE_FRACTION = 0.10


@dataclass(frozen=True)
class Shape:
    """What a round trains with: the per-GPU batch and the trainer's settings."""

    per_device_batch_size: int = 4
    max_length: int = 1024
    gradient_checkpointing: bool = False
    lora_r: int = 8
    lora_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    precompute_ref_log_probs: bool = False

    @property
    def tokens(self) -> int:
        return 2 * self.per_device_batch_size * self.max_length


def per_gpu_bytes(model: ModelShape, mode: Mode, gpus: int, shape: Shape) -> dict[str, float]:
    """The estimate's parts, in bytes on each GPU, and their ``total``."""
    fsdp = mode.startswith("fsdp")
    lora = mode.endswith("lora")
    shards = gpus if fsdp else 1
    n = model.params()
    parts: dict[str, float] = {}
    if lora:
        trainable = model.lora_params(shape.lora_r, shape.lora_targets)
        parts["weights"] = n * FROZEN_BYTES / shards
        parts["reference"] = 0.0  # the adapter disabled
    else:
        trainable = n
        parts["weights"] = 0.0  # counted in the trainable states below
        parts["reference"] = 0.0 if shape.precompute_ref_log_probs else n * FROZEN_BYTES / shards
    parts["trainable_states"] = trainable * TRAINABLE_BYTES / shards
    if not fsdp and gpus > 1:
        parts["ddp_buckets"] = trainable * DDP_BUCKET_BYTES
    if fsdp:
        parts["fsdp_gathered"] = (2 * model.layer_params() + model.root_params()) * FROZEN_BYTES
    per_layer = model.activation_bytes_per_token_layer() * shape.tokens
    if shape.gradient_checkpointing:
        kept = model.num_hidden_layers * 2 * model.hidden_size * shape.tokens
        parts["activations"] = kept + per_layer
    else:
        parts["activations"] = model.num_hidden_layers * per_layer
    parts["overhead"] = OVERHEAD_BYTES
    parts["total"] = sum(parts.values())
    return parts


def fits(model: ModelShape, mode: Mode, gpus: int, shape: Shape, gpu_bytes: float) -> bool:
    return per_gpu_bytes(model, mode, gpus, shape)["total"] <= gpu_bytes * (1 - FREE_FRACTION)


GPU_COUNTS = (1, 2, 4, 8, 16, 32, 64)


def min_gpus(model: ModelShape, mode: Mode, shape: Shape, gpu_bytes: float = 80e9) -> int | None:
    """The fewest GPUs (of ``GPU_COUNTS``) the round fits on; None: not even on 64.

    Under DDP every GPU holds everything, so it fits on one (more only add speed) or never;
    the count of 2 is used to include DDP's gradient buckets."""
    if mode.startswith("ddp"):
        if fits(model, mode, 2, shape, gpu_bytes):
            return 1
        return None
    return next((g for g in GPU_COUNTS if fits(model, mode, g, shape, gpu_bytes)), None)


def table(shape: Shape = Shape(), gpu_bytes: float = 80e9) -> str:
    """The README's markdown table: the fewest 80 GB GPUs per model, mode and checkpointing."""
    columns = [(mode, gc) for mode in MODES for gc in (False, True)]
    header = ["model", "params"] + [f"{m}{' +GC' if gc else ''}" for m, gc in columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for model in MODELS:
        cells = [model.name, f"{model.params() / 1e9:.2f}B"]
        for mode, gc in columns:
            s = Shape(**{**shape.__dict__, "gradient_checkpointing": gc})
            g = min_gpus(model, mode, s, gpu_bytes)
            cells.append("-" if g is None else ("1+" if mode.startswith("ddp") else str(g)))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4, help="per_device_batch_size")
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--gpu-gb", type=float, default=80.0, help="GPU memory, GB (1e9)")
    args = parser.parse_args(argv)
    print(table(Shape(args.batch, args.max_length), args.gpu_gb * 1e9))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
