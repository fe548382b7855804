#!/usr/bin/env bash
# On a lent GPU machine (the device tool's `run`), in one go: the CUDA tests (tests/test_cuda.py
# and the GPU cases of the temporal and model tests), then the worker and model benchmarks on the
# GPU. Its python3 holds torch; the packages it lacks (pyzmq, PyAV, redis, pydantic...) travel as
# wheels in .whl/ (see the device tool's README). Logs go to $OUT (else /tmp/gpu-out).
#     bash bench/gpu.sh            # tests and benchmarks
#     bash bench/gpu.sh tests      # the tests only
#     bash bench/gpu.sh worker     # the tests and bench/worker.py
set -uo pipefail
out=${OUT:-/tmp/gpu-out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site || exit 1
fi
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; nproc
  python3 -c "import torch, numpy, cv2; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'numpy', numpy.__version__, 'cv2', cv2.__version__)"
} 2>&1 | tee "$out/machine.txt"
python3 -m pytest -p no:cacheprovider -q -s -rs tests/test_cuda.py tests/test_temporal_tensor.py tests/test_gpen_model.py \
  tests/test_temporal_worker.py 2>&1 | tee "$out/tests.txt"
[ "${1:-}" = tests ] && exit 0
python3 bench/worker.py --device cuda --gpen --seconds 3 --profile 2>&1 | tee "$out/worker.txt"
[ "${1:-}" = worker ] && exit 0
python3 bench/gpen_model.py --device cuda --models 256 512 1024 --batches 1 4 16 --repeats 3 2>&1 | tee "$out/gpen_model.txt"
python3 bench/gpen_model.py --device cuda --models 512 --batches 16 --repeats 3 --cudnn-benchmark 2>&1 | tee -a "$out/gpen_model.txt"
