"""The CPU temporal blend's numba kernels (workers/cpu_kernels.py) against what they replaced,
from one run, on one thread (torch and OpenCV set to one thread too):

warp      warp_cubic vs cv2.warpAffine(INTER_CUBIC | WARP_INVERSE_MAP, BORDER_REPLICATE), 16
          float32 crops, for three warps: near the identity; and two measured between
          consecutive crops of bench/worker.py's jittered faces (a 1.7 degree turn; a 2.4 degree
          turn with 6% scale), which cut rows into short runs
blend     warp_blend (warp, blend, rounding in one pass) vs the steps it replaced (OpenCV's
          warp, the weight upsampled by cv2.resize, numpy arithmetic, OpenCV's rounding)
normal    a Gauss-Newton step's normal equations at 128 px, batch 16: normal_equations vs the
          torch ops a GPU runs (workers.temporal._normal_equations)
sample    bilinear sampling of 128 px thumbnails at the warps above, batch 16: cpu_kernels.sample
          vs torch's grid_sample (with its grid), one plane (border repeated, as the
          registration samples) and three (zeros outside, as the change map samples)

Times are medians of rounds that alternate the two sides (a shared machine's speed drifts).

    python bench/cpu_kernels.py
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import statistics
import time

import cv2
import numpy as np
import torch

from workers import cpu_kernels, temporal

WARPS = {  # output -> source pixels, for a 512 px crop (the shifts scale with the crop)
    "near identity": [[1.002, 0.003, 0.5], [-0.003, 1.001, 0.3]],
    "1.7 deg": [[1.0061, -0.0304, 6.9888], [0.0303, 1.0062, -10.0827]],
    "2.4 deg, 6% scale": [[0.9408, -0.0415, 25.8398], [0.0414, 0.9404, 6.5701]],
}
INVERSE_CUBIC = cv2.INTER_CUBIC | cv2.WARP_INVERSE_MAP


def per_item_ms(work, items: int, rounds: int) -> list[float]:
    work()  # warm: compiled, caches filled
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        work()
        times.append((time.perf_counter() - started) / items * 1000)
    return times


def in_turn(ours, theirs, items: int, rounds: int) -> tuple[float, float]:
    mine, other = [], []
    for _ in range(rounds):
        mine += per_item_ms(ours, items, 1)
        other += per_item_ms(theirs, items, 1)
    return statistics.median(mine), statistics.median(other)


def old_blend(previous, m, weight, restored, rounded, out):
    size = previous.shape[0]
    cv2.warpAffine(previous, m, (size, size), dst=out, flags=INVERSE_CUBIC, borderMode=cv2.BORDER_REPLICATE)
    upsampled = cv2.resize(cv2.merge([weight] * 3), (size, size), interpolation=cv2.INTER_LINEAR)
    as_float = restored.astype(np.float32)
    np.subtract(out, as_float, out=out)
    np.multiply(out, upsampled, out=out)
    np.add(out, as_float, out=out)
    clipped = cv2.threshold(out, 0, 0, cv2.THRESH_TOZERO)[1]
    cv2.convertScaleAbs(clipped, dst=rounded)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    cpu_kernels.warm_up()
    rng = np.random.default_rng(0)
    print(f"torch {torch.__version__}, OpenCV {cv2.__version__}, one thread; ms per crop, median of {args.rounds}")

    print(f"\n{'crop':>5} {'warp':<20}{'numba':>8}{'OpenCV':>8}{'ratio':>7}  {'blend':>8}{'before':>8}{'ratio':>7}")
    for size in (256, 512):
        crops = [cv2.GaussianBlur(rng.uniform(0, 255, (size, size, 3)).astype(np.float32), (0, 0), 1.0)
                 for _ in range(16)]
        restored = [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(16)]
        weights = [rng.uniform(0, 0.9, (temporal.LOWPASS_SIZE,) * 2).astype(np.float32) for _ in range(16)]
        out, rounded = np.empty_like(crops[0]), np.empty_like(restored[0])
        for name, m in WARPS.items():
            m = np.array(m)
            m[:, 2] *= size / 512
            ours, theirs = in_turn(
                lambda: [cpu_kernels.warp_cubic(c, m, out) for c in crops],
                lambda: [cv2.warpAffine(c, m, (size, size), dst=out, flags=INVERSE_CUBIC,
                                        borderMode=cv2.BORDER_REPLICATE) for c in crops], 16, args.rounds)
            fused, before = in_turn(
                lambda: [cpu_kernels.warp_blend(c, m, w, r, rounded, out) for c, w, r in zip(crops, weights, restored)],
                lambda: [old_blend(c, m, w, r, rounded, out) for c, w, r in zip(crops, weights, restored)],
                16, args.rounds)
            print(f"{size:>5} {name:<20}{ours:>8.3f}{theirs:>8.3f}{theirs / ours:>7.2f}  "
                  f"{fused:>8.3f}{before:>8.3f}{before / fused:>7.2f}", flush=True)

    side, n = temporal.LOWPASS_SIZE, 16
    warped = torch.from_numpy(rng.uniform(0, 255, (n, 1, side, side)).astype(np.float32))
    sources = torch.from_numpy(rng.uniform(-1.05, 1.05, (n, 2, side, side)).astype(np.float32))
    target = torch.from_numpy(rng.uniform(0, 255, (n, 1, side, side)).astype(np.float32))
    c = temporal._centres(side, torch.device("cpu"))
    columns = torch.empty((n, 9, side, side))
    columns[:, 8:] = target
    ours, theirs = in_turn(lambda: cpu_kernels.normal_equations(warped.numpy(), sources.numpy(), c.numpy(),
                                                                target.numpy()),
                           lambda: temporal._normal_equations(warped, sources, c, columns), n, args.rounds)
    print(f"\nnormal equations, {side} px, batch {n}: numba {ours:.3f}, torch {theirs:.3f} ms per face, "
          f"ratio {theirs / ours:.2f}")

    print(f"\nbilinear sampling, {side} px thumbnails, batch {n} (the registration's and the change map's): "
          f"ms per face\n{'warp':<20}{'planes':>7}{'numba':>8}{'torch':>8}{'ratio':>7}")
    to_norm, from_norm = temporal._normalising(side)
    for name, m in WARPS.items():
        m = np.array(m)
        m[:, 2] *= side / 512
        theta = torch.from_numpy(np.repeat((to_norm @ temporal._as3x3(m) @ from_norm)[None], n, axis=0).astype(np.float32))
        for planes, padding in ((1, "border"), (3, "zeros")):  # the scores and steps, the change map
            images = torch.from_numpy(rng.uniform(0, 255, (n, planes, side, side)).astype(np.float32))
            ours, theirs = in_turn(
                lambda: cpu_kernels.sample(images.numpy(), theta.numpy(), padding == "border"),
                lambda: torch.nn.functional.grid_sample(images, temporal._grid(theta, side, False), mode="bilinear",
                                                        padding_mode=padding, align_corners=False), n, args.rounds)
            print(f"{name:<20}{planes:>7}{ours:>8.3f}{theirs:>8.3f}{theirs / ours:>7.2f}", flush=True)


if __name__ == "__main__":
    main()
