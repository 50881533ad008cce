# syntax=docker/dockerfile:1
# The forecaster image: `make image` (docker build -t forecaster:dev .); see docs/deploy.md.
#
# Two stages. The builder turns this checkout into a wheel and fetches wheels for every
# dependency; the runtime stage installs them into a venv from that folder alone (--no-index),
# through a bind mount, so neither the wheels nor pip's cache become a layer and nothing is
# compiled there: a dependency without a wheel for this platform fails the build instead of
# pulling a compiler into the image. The gRPC code generated from keda/externalscaler.proto is
# committed under forecaster/scaler/generated/ and ships inside the wheel; no protoc runs here.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS builder
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
WORKDIR /src
# .dockerignore lets in only pyproject.toml, README.md and forecaster/.
COPY . .
RUN python -m pip wheel --wheel-dir /wheels .

FROM ${PYTHON_IMAGE} AS runtime
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    OMP_NUM_THREADS=1 \
    OPENBLAS_NUM_THREADS=1 \
    MKL_NUM_THREADS=1 \
    MPLCONFIGDIR=/tmp/matplotlib \
    PATH=/opt/forecaster/bin:$PATH
# One BLAS/OpenMP thread per process: the fit workers are processes, and more threads per fit
# only contend for the pod's CPU limit (see pin_math_threads in forecaster/cli.py).
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    python -m venv /opt/forecaster \
    && /opt/forecaster/bin/pip install --no-cache-dir --no-index --find-links=/wheels forecaster \
    && /opt/forecaster/bin/pip uninstall --yes pip \
    && groupadd --system --gid 10001 forecaster \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin forecaster

# A numeric UID, so Kubernetes' runAsNonRoot can check it without reading /etc/passwd.
USER 10001:10001
WORKDIR /tmp
# 8080: HTTP (/healthz, /readyz, /metrics, /api/v1); 50051: gRPC (KEDA external scaler, health).
EXPOSE 8080 50051

# For `docker run` only: Kubernetes ignores HEALTHCHECK and uses the StatefulSet's probes
# (keda/forecaster/statefulset.yaml: startup gRPC health, readiness /readyz, liveness /healthz).
HEALTHCHECK --interval=30s --timeout=3s --start-period=20s --retries=3 \
    CMD ["python", "-c", \
         "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=2)"]

ENTRYPOINT ["forecaster"]
CMD ["serve", "--config", "/etc/forecaster/config.yaml"]
