# SWQuant images. Two targets:
#   cpu  the API, the one-shot migrations and CPU workers (the default target: it is last)
#        docker build --target cpu -t swquant:cpu .
#   gpu  the CUDA worker
#        docker build --target gpu -t swquant:gpu .
#
# torch is installed first, from the PyTorch index for the wanted build, and pinned through a
# constraints file while the project is installed, so no dependency can swap it for another build.
#
# CUDA: torch 2.13.0 is published for CUDA 12.6, 13.0 and 13.2 (there is no cu128 build of it).
# The default is CUDA 13.0 (driver >= 580, Turing or newer). For older drivers build with
#   --build-arg CUDA_VERSION=12.6.3 --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126
# The base image's CUDA version must match the wheel's: the NVIDIA container runtime refuses to
# start a container whose CUDA version the host driver does not support.

ARG PYTHON_VERSION=3.11
ARG CUDA_VERSION=13.0.2
ARG UBUNTU_VERSION=24.04

# --------------------------------------------------------------------------- gpu: build the venv
FROM nvidia/cuda:${CUDA_VERSION}-base-ubuntu${UBUNTU_VERSION} AS gpu-build

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu130

ENV DEBIAN_FRONTEND=noninteractive \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

# Distribution packages follow the pinned base image's release; their versions are not pinned
# because Ubuntu drops superseded versions from its archive, which would break rebuilds.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*

RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

RUN printf 'torch==%s\n' "${TORCH_VERSION}" > /opt/venv/constraints.txt \
    && pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"

WORKDIR /src
COPY pyproject.toml README.md ./
COPY quant_core ./quant_core
COPY swq_shared ./swq_shared
COPY api ./api
COPY worker ./worker
# -I: check the installed packages, not the source folder in the working directory.
RUN pip install --no-cache-dir --constraint /opt/venv/constraints.txt ".[eval]" \
    && python -I -c "import importlib.util as u, sys; m = [n for n in ('quant_core', 'swq_shared', 'api', 'worker') if u.find_spec(n) is None]; sys.exit(f'packages not installed: {m}' if m else 0)"

# --------------------------------------------------------------------------- gpu: the worker image
FROM nvidia/cuda:${CUDA_VERSION}-base-ubuntu${UBUNTU_VERSION} AS gpu

ENV DEBIAN_FRONTEND=noninteractive \
    LANG=C.UTF-8 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/venv/bin:$PATH \
    HF_HOME=/data/hf \
    SWQUANT_DATA_DIR=/data/swquant \
    SWQUANT_DEVICE=cuda

# libpq5: psycopg's fallback when no binary build of it is installed. See the note on DL3008 above.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 libpq5 ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --gid 10001 swquant \
    && useradd --uid 10001 --gid swquant --create-home --shell /usr/sbin/nologin swquant \
    && mkdir -p /app /data/hf /data/swquant /data/tmp \
    && chown swquant:swquant /data /data/hf /data/swquant /data/tmp

COPY --from=gpu-build /opt/venv /opt/venv
WORKDIR /app
COPY alembic.ini ./
COPY migrations ./migrations
COPY bench ./bench

USER 10001:10001

# One worker process per GPU; each job in a fresh process the task forks (worker/job_process.py).
CMD ["celery", "-A", "worker.celery_app", "worker", "--loglevel", "INFO", "--queues", "gpu", \
     "--pool", "solo", "--prefetch-multiplier", "1"]

# --------------------------------------------------------------------------- cpu: build the venv
FROM python:${PYTHON_VERSION}-slim-trixie AS cpu-build

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

RUN printf 'torch==%s\n' "${TORCH_VERSION}" > /opt/venv/constraints.txt \
    && pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"

WORKDIR /src
COPY pyproject.toml README.md ./
COPY quant_core ./quant_core
COPY swq_shared ./swq_shared
COPY api ./api
COPY worker ./worker
# -I: check the installed packages, not the source folder in the working directory.
RUN pip install --no-cache-dir --constraint /opt/venv/constraints.txt ".[eval]" \
    && python -I -c "import importlib.util as u, sys; m = [n for n in ('quant_core', 'swq_shared', 'api', 'worker') if u.find_spec(n) is None]; sys.exit(f'packages not installed: {m}' if m else 0)"

# --------------------------------------------------------------------------- cpu: API and CPU workers
FROM python:${PYTHON_VERSION}-slim-trixie AS cpu

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/venv/bin:$PATH \
    HF_HOME=/data/hf \
    SWQUANT_DATA_DIR=/data/swquant

# libpq5: psycopg's fallback when no binary build of it is installed. Distribution packages follow
# the pinned base image's release; Debian drops superseded versions, so pinning them breaks rebuilds.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends libpq5 \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --gid 10001 swquant \
    && useradd --uid 10001 --gid swquant --create-home --shell /usr/sbin/nologin swquant \
    && mkdir -p /app /data/hf /data/swquant /data/tmp \
    && chown swquant:swquant /data /data/hf /data/swquant /data/tmp

COPY --from=cpu-build /opt/venv /opt/venv
WORKDIR /app
COPY alembic.ini ./
COPY migrations ./migrations
COPY bench ./bench

USER 10001:10001
EXPOSE 8000

# Slim images have no curl: ask the API with the standard library.
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4).status == 200 else 1)"]

# Standalone default: migrate, then serve. docker-compose.yml runs migrations once, in `migrate`.
CMD ["sh", "-c", "alembic upgrade head && exec uvicorn api.app:create_app --factory --host 0.0.0.0 --port 8000"]
