# gpen-stream decoder side: `gpen-stream serve` (the job daemon), `restore`, `live`, `models`,
# `keys` and the clients (`submit`, `status`, `watch`, ...). Build context: the repository root.
#
#   docker compose -f docker/compose.yaml build serve
#   docker build -f docker/app.Dockerfile -t gpen-stream-app .
#
# The face detector (and ParseNet for --mask parse) runs in this process, so it needs torch:
# CPU wheels by default, which is what a farm decoder needs (GPEN runs on the workers). For
# detection on a GPU: --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu130 and a
# GPU reservation for the service. FFmpeg comes inside PyAV's wheels; nothing else is needed.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---------------------------------------------------------------- build: torch, the project
FROM ${PYTHON_IMAGE} AS build
# the pins of .ci/run (tests/test_docker_files.py keeps them equal)
ARG TORCH_VERSION=2.14.1
ARG TORCHVISION_VERSION=0.29.1
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" \
        "torch==${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}"
WORKDIR /src
# what `pip install .` reads: the metadata (the readme included) and the four packages
COPY pyproject.toml README.md ./
COPY configs ./configs
COPY gpen ./gpen
COPY streamer ./streamer
COPY workers ./workers
# torch is already there and satisfies the project's range: pip keeps it
RUN /opt/venv/bin/pip install --no-cache-dir .

# ---------------------------------------------------------------- runtime
FROM ${PYTHON_IMAGE}
ARG UID=10001
ARG GID=10001
# libgl1, libglib2.0-0: what opencv-python's wheel loads from the system
# Distribution packages are not pinned (DL3008): they follow the base image, which is.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends libgl1 libglib2.0-0 \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --gid "${GID}" gpen \
    && useradd --uid "${UID}" --gid gpen --create-home --shell /usr/sbin/nologin gpen \
    && mkdir -p /var/cache/gpen-stream/models /media/in /media/out \
    && chown -R gpen:gpen /var/cache/gpen-stream /media/out
COPY --from=build /opt/venv /opt/venv
# GPEN_STREAM_HOME: the weight store (gpen/weights.py); the models are in its models/ folder.
# GPEN_STREAM_SERVE_HTTP_HOST (serve.http_host, default 127.0.0.1): /metrics and /healthz must
# listen on the container's network to be published. (An environment variable outranks a
# --config file; set it again with -e to change it.)
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    GPEN_STREAM_HOME=/var/cache/gpen-stream \
    NUMBA_CACHE_DIR=/var/cache/gpen-stream/numba \
    GPEN_STREAM_SERVE_HTTP_HOST=0.0.0.0
# fail the build, not the first job, when a library is missing,
# and compile the CPU temporal blend's numba kernels into NUMBA_CACHE_DIR (in the volume: a
# container starts without the ~15 s compile; a CPU unlike the build machine's adds its own)
RUN python -c "import av, cv2, torch, torchvision, zmq, facexlib, streamer.engine, streamer.serve.daemon" \
    && gpen-stream --help >/dev/null \
    && python -c "from workers import cpu_kernels; cpu_kernels.warm_up()" \
    && chown -R gpen:gpen /var/cache/gpen-stream
USER ${UID}:${GID}
WORKDIR /home/gpen
VOLUME ["/var/cache/gpen-stream"]
# serve.http_port: /metrics and /healthz (streamer/serve/http.py)
EXPOSE 9310
# For serve: 200 when Redis answers and the workers are up, else 503 (urlopen raises: exit 1).
# restore, live and the clients serve no HTTP: run them with --no-healthcheck (docker run) or
# let the status read unhealthy; it does not stop them.
HEALTHCHECK --interval=30s --timeout=5s --start-period=180s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('GPEN_STREAM_SERVE_HTTP_PORT', '9310'), timeout=4)"]
ENTRYPOINT ["gpen-stream"]
# serve alone starts its own worker (CPU here) and expects Redis at serve.redis; docker/compose.yaml
# runs it with --farm, Redis and GPU workers
CMD ["serve", "--input-root", "/media/in", "--output-root", "/media/out"]
