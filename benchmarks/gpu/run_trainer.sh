#!/usr/bin/env bash
# On a lent GPU machine (see prepare.sh): `python -m benchmarks trainer` with a real broker.
set -euo pipefail
export PYTHONUNBUFFERED=1
PY=${PY:-python3}
T=${T:-/tmp/dev}
mkdir -p $T
if [ -z "${SKIP_PIP:-}" ]; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target $T/site .dev/whl/*.whl
  export PYTHONPATH=$T/site
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD/core/src:$PWD/services/trainer/src:$PWD
tar -C $T -xJf .dev/jre.tar.xz && export PATH=$T/jre/bin:$PATH
mkdir -p $T/kafka && tar -C $T/kafka -xJf .dev/kafka.tar.xz && export KAFKA_HOME=$T/kafka
mkdir -p $T/model && cp .dev/model/* $T/model/ && xz -df $T/model/tokenizer.json.xz
# The 270 MB weights cannot travel (64 MiB per call, no downloads there): same architecture
# and shapes from config.json, random weights. Throughput depends on shapes, not values.
$PY - <<PYEOF
import torch
from transformers import AutoConfig, AutoModelForCausalLM
torch.manual_seed(0)
config = AutoConfig.from_pretrained("$T/model")
model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
model.save_pretrained("$T/model")
print("random-weight model:", sum(p.numel() for p in model.parameters()) / 1e6, "M params")
PYEOF
export ONPOLICY_STACK_MODEL=$T/model
java -version 2>&1 | head -1
$PY -c "import torch, transformers, trl, peft, datasets, pyarrow, accelerate; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '-'); print('transformers', transformers.__version__, 'trl', trl.__version__, 'peft', peft.__version__, 'datasets', datasets.__version__, 'pyarrow', pyarrow.__version__, 'accelerate', accelerate.__version__)"
nvidia-smi -L 2>/dev/null || true
$PY -m benchmarks trainer "$@" 2>&1 | grep -v -E "it/s\]|examples/s\]" | tee ${OUT:-$T}/bench.log
cp benchmarks/results/trainer*.json ${OUT:-$T}/ 2>/dev/null || true
