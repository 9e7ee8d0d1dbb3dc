"""Convert a GGUF checkpoint to a plain safetensors folder (model, tokenizer, chat template).

Runs with the vLLM environment's interpreter (it has torch, transformers and gguf), never
imported by onpolicy itself: ``python _convert_gguf.py GGUF_FILE OUT_DIR``.

transformers dequantizes GGUF weights on load but refuses to ``save_pretrained`` such a model,
so the weights are copied into a fresh model built from the same config (minus the
quantization config) and that one is saved.
"""

import sys
from pathlib import Path


def main(gguf_file: str, out_dir: str) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = Path(gguf_file)
    out = Path(out_dir)
    tmp = out.with_name(out.name + ".partial")
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    loaded = AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32
    )
    config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.torch_dtype = "bfloat16"
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = fresh.load_state_dict(loaded.state_dict(), strict=False)
    # Tied embeddings show up as a "missing" lm_head; anything else is a real mismatch.
    missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise SystemExit(f"weights do not match: missing={missing} unexpected={unexpected}")
    fresh = fresh.to(torch.bfloat16)
    fresh.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    tmp.rename(out)
    print(f"saved {out}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
