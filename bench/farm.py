"""The farm, measured in one run.

scaling   throughput (crops/s) with 1, 2 and 4 worker processes, on one job and on 4 concurrent
          jobs, with a fixed-latency stand-in restorer that sleeps per batch like a GPU
          (``standin-8+2ms-<size>px``: 8 ms per call + 2 ms per crop). The workers are
          ``gpen-stream worker`` processes registered in a real Redis; the jobs run on one engine
          (as ``serve`` runs them) and find the workers there. Clips carry many small faces per
          frame so the model, not decoding, is what more workers can speed up.
memory    the memory model's estimate (``workers.budget.calibrate`` at batch 4, in a fresh
          process) against the measured peak (a fresh process loads the model and runs one
          batch; peak resident memory minus what the process held before loading) for
          GPEN-BFR-256 and -512 at batch 1 and 4, with deterministic weights. On CUDA the same
          figures come from torch.cuda.max_memory_allocated.

    python bench/farm.py
    python bench/farm.py --skip-memory --frames 40
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.support, beside bench/

import numpy as np  # noqa: E402
import torch  # noqa: E402

from configs import EngineSettings, JobOptions, WorkerSettings, load_settings  # noqa: E402
from configs.keys import Keys  # noqa: E402
from streamer.engine import Engine  # noqa: E402
from streamer.jobs.restore import restore_file  # noqa: E402
from tests.support.clips import make_clip  # noqa: E402
from tests.support.redis_server import RedisServer, free_port  # noqa: E402
from workers.registry import registered_workers  # noqa: E402

CLI = [sys.executable, "-m", "streamer"]


def _faces_file(clip, path: Path, faces: int, width: int, height: int) -> None:
    """``faces`` copies of the clip's face per frame, laid out in a grid (tiny crops)."""
    cols = int(np.ceil(np.sqrt(faces)))
    rows = int(np.ceil(faces / cols))
    lines = []
    for t, lm in enumerate(clip.landmarks):
        centre = lm.mean(axis=0)
        scale = 0.35
        placed = []
        for k in range(faces):
            cx = (k % cols + 0.5) * width / cols
            cy = (k // cols + 0.5) * height / rows
            placed.append({"landmarks": ((lm - centre) * scale + [cx, cy]).tolist()})
        lines.append(json.dumps({"frame": t, "faces": placed}))
    path.write_text("\n".join(lines) + "\n")


def scaling(args, tmp: Path) -> None:
    server = RedisServer(tmp / "redis", appendonly=False).start()
    model = f"standin-8+2ms-{args.crop}px"
    clips = []
    for j in range(4):
        clip = make_clip(tmp / f"c{j}.mp4", frames=args.frames, width=320, height=240, audio=False, seed=j)
        faces = tmp / f"c{j}.faces.jsonl"
        _faces_file(clip, faces, args.faces, 320, 240)
        clips.append((clip, faces))
    options = load_settings(JobOptions, overrides={"model": model, "temporal": "off", "min_face": 0,
                                                   "max_faces": args.faces, "crf": 23, "preset": "ultrafast"})
    print(f"stand-in {model}; {args.faces} faces/frame, {args.frames} frames/job, 320x240; batch {args.batch}; "
          f"{os.cpu_count()} CPU cores")
    print(f"{'workers':>7} {'jobs':>5} {'crops/s':>9} {'vs 1 worker':>12}")
    base: dict[int, float] = {}
    try:
        for count in (1, 2, 4):
            prefix = f"farm{count}"
            env = {**os.environ, "GPEN_STREAM_WORKER_BATCH": str(args.batch), "GPEN_STREAM_WORKER_BATCH_WAIT_MS": "2",
                   "GPEN_STREAM_WORKER_CREDITS": str(4 * args.batch)}
            procs = [subprocess.Popen([*CLI, "worker", "--endpoint", f"tcp://127.0.0.1:{free_port()}", "--redis",
                                       server.url, "--prefix", prefix, "--model", model, "--log-level", "warning"],
                                      env=env) for _ in range(count)]
            try:
                while len(registered_workers(server.client(), Keys(prefix))) < count:
                    time.sleep(0.05)
                engine = Engine(load_settings(EngineSettings, overrides={"redis": server.url}),
                                load_settings(WorkerSettings), prefix=prefix)
                for jobs in (1, 4):
                    started = time.perf_counter()
                    threads = [threading.Thread(target=restore_file, args=(c.path, tmp / f"out{i}.mp4", options),
                                                kwargs={"engine": engine, "faces_file": f})
                               for i, (c, f) in enumerate(clips[:jobs])]
                    for t in threads:
                        t.start()
                    for t in threads:
                        t.join()
                    rate = jobs * args.frames * args.faces / (time.perf_counter() - started)
                    base.setdefault(jobs, rate)
                    print(f"{count:>7} {jobs:>5} {rate:>9.0f} {rate / base[jobs]:>11.2f}x")
                engine.close()
            finally:
                for p in procs:
                    p.terminate()
                for p in procs:
                    p.wait(30)
    finally:
        server.stop()


MEASURE = r"""
import json, sys, numpy as np, torch
from workers.budget import _give_back_freed_memory, _rss_now, _rss_peak, _reset_rss_peak, calibrate
from workers.restorers import build_restorer
mode, weights, batch = sys.argv[1], sys.argv[2], int(sys.argv[3])
device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
dtype = torch.float16 if device.type == "cuda" else torch.float32
torch.set_num_threads(1)
def used():
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return _rss_peak()
_give_back_freed_memory(); _reset_rss_peak()
before = torch.cuda.memory_allocated(device) if device.type == "cuda" else _rss_now()
r = build_restorer(sys.argv[4], device=device, dtype=dtype, weights=weights)
if mode == "estimate":
    m = calibrate(r, device, weights=r.weights_bytes(), batch=4)
    print(json.dumps({"1": m.needed(1), "4": m.needed(4)}))
else:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    r.restore(np.zeros((batch, r.size, r.size, 3), np.uint8))
    print(json.dumps({"peak": used() - before}))
"""


def memory(args, tmp: Path) -> None:
    from gpen import RELEASED_CONFIGS
    from gpen.testing import deterministic_state_dict

    print(f"memory model vs measured peak ({'cuda' if torch.cuda.is_available() else 'cpu, resident memory'}; "
          "fresh process each)")
    print(f"{'model':<14} {'batch':>5} {'estimate MiB':>13} {'measured MiB':>13} {'error':>7}")
    script = tmp / "measure.py"
    script.write_text(MEASURE)
    for name in ("GPEN-BFR-256", "GPEN-BFR-512"):
        weights = tmp / f"{name}.pth"
        torch.save(deterministic_state_dict(RELEASED_CONFIGS[name]), weights)
        run = lambda *a: json.loads(subprocess.run([sys.executable, str(script), *map(str, a), name],  # noqa: E731
                                                   capture_output=True, text=True, check=True).stdout)
        estimate = run("estimate", weights, 4)
        for batch in (1, 4):
            peak = run("measure", weights, batch)["peak"]
            est = estimate[str(batch)]
            print(f"{name:<14} {batch:>5} {est / 2**20:>13.0f} {peak / 2**20:>13.0f} {(est - peak) / peak:>+7.1%}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--frames", type=int, default=60)
    ap.add_argument("--faces", type=int, default=12)
    ap.add_argument("--crop", type=int, default=64)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--skip-scaling", action="store_true")
    ap.add_argument("--skip-memory", action="store_true")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="gpen-bench-farm-") as tmp:
        if not args.skip_scaling:
            scaling(args, Path(tmp))
        if not args.skip_memory:
            memory(args, Path(tmp))


if __name__ == "__main__":
    main()
