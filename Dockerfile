# syntax=docker/dockerfile:1
# Osprey labeling backend: one file, a CPU image and a CUDA image (docs/deploy.md).
#
#   docker build -t osprey-labeling:cpu .
#   docker build -t osprey-labeling:cuda --build-arg VARIANT=cuda .
#   docker build -t osprey-labeling:cuda --build-arg VARIANT=cuda \
#       --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 .   # a specific CUDA build
#
# Both variants run on python:3.11-slim: PyTorch's CUDA wheels carry their own CUDA runtime (the nvidia-*
# wheels), so the GPU image only needs the host's NVIDIA driver and the NVIDIA Container Toolkit.
# The entry point is `osprey`: `serve` (default), `worker`, `worker --queues training`, `schedule`, `run`,
# `download`. Weights are never baked in: mount them under MODEL_DIR (`osprey download` fetches them).

ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm
ARG VARIANT=cpu

# --- dependencies, per variant --------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS deps-base
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

FROM deps-base AS deps-cpu
# CPU-only wheels: the image is ~3 GB smaller without the CUDA libraries.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV OSPREY_EXTRAS=""
RUN pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" torch==2.14.1 torchvision==0.29.1

FROM deps-base AS deps-cuda
# PyPI's Linux x86_64 torch wheels are CUDA builds; pass TORCH_INDEX_URL to pick another CUDA version.
ARG TORCH_INDEX_URL=https://pypi.org/simple
ENV OSPREY_EXTRAS="[gpu]"
RUN pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" torch==2.14.1 torchvision==0.29.1

# hadolint ignore=DL3006
FROM deps-${VARIANT} AS builder
WORKDIR /src
COPY pyproject.toml README.md ./
COPY osprey_core ./osprey_core
COPY backend ./backend
COPY training ./training
# The pinned torch from the stage above satisfies the project's own pin, so pip keeps it. DL3013: this
# is the project itself; its dependencies are pinned in pyproject.toml.
# hadolint ignore=DL3013
RUN pip install --no-cache-dir ".${OSPREY_EXTRAS}" && python -c "import osprey_core, backend, torch"

# --- runtime --------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime
ARG VARIANT=cpu
LABEL org.opencontainers.image.title="osprey-labeling" \
      org.opencontainers.image.description="Osprey region labels for Label Studio and CVAT (${VARIANT})" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    MODEL_DIR=/data \
    HF_HOME=/cache/huggingface \
    HOST=0.0.0.0 \
    PORT=9090 \
    LOG_LEVEL=INFO
RUN groupadd --system --gid 10001 osprey \
    && useradd --system --uid 10001 --gid osprey --home-dir /home/osprey --create-home osprey \
    && mkdir -p /data /cache/huggingface \
    && chown -R osprey:osprey /data /cache
COPY --from=builder /opt/venv /opt/venv
USER 10001:10001
WORKDIR /home/osprey
VOLUME ["/data", "/cache/huggingface"]
EXPOSE 9090
# /health needs no auth; workers have no HTTP server, compose disables this check for them.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('PORT', '9090'), timeout=4)"]
ENTRYPOINT ["osprey"]
CMD ["serve"]
