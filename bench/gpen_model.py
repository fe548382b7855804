"""GPEN generator speed: ours vs the official grouped-conv formulation, same weights, same run.

Prints ms per face for each (model, batch, dtype) and the ratio baseline / ours, where the
baseline is ``tests.support.reference.reference_forward`` (per-sample grouped modulated convs and
upfirdn2d as GPEN's CPU fallback does it). Weights are deterministic, in the official layout.
Runs alternate between the two implementations and the median is kept, so machine drift
hits both alike.

    python bench/gpen_model.py                       # 256 and 512, batch 1 and 4, fp32 and bf16 (CPU)
    python bench/gpen_model.py --models 256 --batches 1 --repeats 3
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.support, beside bench/

import argparse
import statistics
import time

import torch

from gpen import RELEASED_CONFIGS, load_generator
from tests.support.reference import reference_forward
from gpen.testing import deterministic_input, deterministic_state_dict

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _time(fn, sync) -> float:
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["256", "512"], help="sizes of GPEN-BFR-<size>")
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 4])
    ap.add_argument("--dtypes", nargs="+", default=None, help="fp32 bf16 fp16 (default: fp32 bf16 on CPU, fp32 fp16 on CUDA)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--cudnn-benchmark", action="store_true", help="let cuDNN time its algorithms per shape first")
    args = ap.parse_args()
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    if args.threads:
        torch.set_num_threads(args.threads)
    dtypes = args.dtypes or (["fp32", "fp16"] if args.device.startswith("cuda") else ["fp32", "bf16"])
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    print(f"device {args.device}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"repeats {args.repeats} (median)" + (", cudnn.benchmark" if args.cudnn_benchmark else ""))
    print(f"{'model':<14}{'batch':>6}{'dtype':>6}{'ours ms/face':>14}{'grouped ms/face':>17}{'ratio':>8}{'max|diff|':>11}")
    for size in args.models:
        name = f"GPEN-BFR-{size}"
        state = deterministic_state_dict(RELEASED_CONFIGS[name])
        for dtype_name in dtypes:
            dtype = DTYPES[dtype_name]
            model = load_generator(state, device=args.device, dtype=dtype)
            baseline = load_generator(state, device=args.device).to(dtype)  # all in one dtype, like GPEN
            for batch in args.batches:
                x = deterministic_input(batch, int(size)).to(args.device)
                with torch.inference_mode():
                    ours_out, ref_out = model(x), reference_forward(baseline, x, dtype)  # warm-up
                    ours, ref = [], []
                    for _ in range(args.repeats):
                        ours.append(_time(lambda: model(x), sync))
                        ref.append(_time(lambda: reference_forward(baseline, x, dtype), sync))
                diff = (ours_out.float() - ref_out.float()).abs().max().item()
                o, r = statistics.median(ours) * 1e3 / batch, statistics.median(ref) * 1e3 / batch
                print(f"{name:<14}{batch:>6}{dtype_name:>6}{o:>14.2f}{r:>17.2f}{r / o:>8.2f}{diff:>11.2e}", flush=True)


if __name__ == "__main__":
    main()
