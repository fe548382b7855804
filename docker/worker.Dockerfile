# gpen-stream inference worker: GPEN on one NVIDIA GPU, serving decoders over ZeroMQ
# (`gpen-stream worker`; README.md, "A GPU farm"). Build context: the repository root.
#
#   docker compose -f docker/compose.yaml build worker
#   docker build -f docker/worker.Dockerfile -t gpen-stream-worker .
#
# PyTorch's CUDA wheels bring their own CUDA runtime, cuBLAS and cuDNN (nvidia-* wheels), so
# the base is NVIDIA's smallest CUDA image: it sets what the NVIDIA Container Toolkit reads
# (NVIDIA_VISIBLE_DEVICES, NVIDIA_DRIVER_CAPABILITIES, and NVIDIA_REQUIRE_CUDA, which checks the
# host's driver when the container starts) without a second copy of those libraries. CUDA 13
# needs an NVIDIA driver >= 580. For an older driver pick a CUDA 12 base and wheels together:
#   --build-arg CUDA_IMAGE=nvidia/cuda:12.8.1-base-ubuntu24.04 \
#   --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
# Python 3.11 is a standalone CPython installed by uv (the base image has no Python).

ARG CUDA_IMAGE=nvidia/cuda:13.0.2-base-ubuntu24.04
ARG UV_IMAGE=ghcr.io/astral-sh/uv:0.9.30

FROM ${UV_IMAGE} AS uv

# ---------------------------------------------------------------- build: Python, torch, the project
FROM ${CUDA_IMAGE} AS build
ARG PYTHON_VERSION=3.11
# the pins of .ci/run (tests/test_docker_files.py keeps them equal)
ARG TORCH_VERSION=2.14.1
ARG TORCHVISION_VERSION=0.29.1
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu130
ENV UV_PYTHON_INSTALL_DIR=/opt/python \
    UV_PYTHON_PREFERENCE=only-managed \
    PIP_DISABLE_PIP_VERSION_CHECK=1
COPY --from=uv /uv /usr/local/bin/uv
RUN uv python install "${PYTHON_VERSION}" \
    && uv venv --seed --python "${PYTHON_VERSION}" /opt/venv
RUN /opt/venv/bin/pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" \
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
FROM ${CUDA_IMAGE}
ARG UID=10001
ARG GID=10001
# libgl1, libglib2.0-0: what opencv-python's wheel loads from the system (cv2 is imported by the
# worker's temporal blending). The base's own "ubuntu" user (uid 1000) is removed so that UID may
# be 1000 (the usual first user of a host, whose folders are bind-mounted).
# Distribution packages are not pinned (DL3008): they follow the base image, which is.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates libgl1 libglib2.0-0 \
    && rm -rf /var/lib/apt/lists/* \
    && if id -u ubuntu >/dev/null 2>&1; then userdel --remove ubuntu; fi \
    && groupadd --gid "${GID}" gpen \
    && useradd --uid "${UID}" --gid gpen --create-home --shell /usr/sbin/nologin gpen \
    && mkdir -p /var/cache/gpen-stream/models \
    && chown -R gpen:gpen /var/cache/gpen-stream
COPY --from=build /opt/python /opt/python
COPY --from=build /opt/venv /opt/venv
# GPEN_STREAM_HOME: the weight store (gpen/weights.py); the models are in its models/ folder
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt \
    GPEN_STREAM_HOME=/var/cache/gpen-stream \
    NUMBA_CACHE_DIR=/var/cache/gpen-stream/numba
# fail the build, not the first job, when a library is missing (no GPU is needed to import),
# and compile the CPU temporal blend's numba kernels into NUMBA_CACHE_DIR (in the volume: a
# container starts without the ~15 s compile; a CPU unlike the build machine's adds its own)
RUN python -c "import av, cv2, torch, torchvision, zmq, workers.worker, streamer.engine" \
    && gpen-stream --help >/dev/null \
    && python -c "from workers import cpu_kernels; cpu_kernels.warm_up()" \
    && chown -R gpen:gpen /var/cache/gpen-stream
USER ${UID}:${GID}
WORKDIR /home/gpen
VOLUME ["/var/cache/gpen-stream"]
EXPOSE 5555
# No HEALTHCHECK: a worker has no health endpoint. A live worker keeps its Redis registration
# (<prefix>:worker:<id>, worker.registry_ttl_s) fresh; serve's /healthz and /metrics
# (gpen_workers) show which workers a daemon can use.
ENTRYPOINT ["gpen-stream"]
# A non-loopback endpoint needs CURVE keys (mount a `gpen-stream keys DIR` folder at /keys) or
# --insecure; see docker/README.md.
CMD ["worker", "--endpoint", "tcp://0.0.0.0:5555", "--model", "GPEN-BFR-512", "--device", "cuda", "--keys", "/keys"]
