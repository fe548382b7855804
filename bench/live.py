"""Live feeds, measured in one run: latency from a frame's arrival to its encode, and the
enhancement hit rate (frames whose faces came back before their deadline), for 1, 4 and 8
streams sharing one worker, with three restorers:

passthrough  no faces (an empty faces list): the pipeline's own latency, the baseline
identity     faces found (the clip's own faces, no detector), cut, sent to the worker,
             returned unchanged and pasted back: everything but a network
standin      faces as above, restored by a stand-in that takes a fixed time per call plus a
             little per crop, as a GPU running GPEN would (``standin-<base>+<per>ms-<size>px``)

Each stream is the same clip played in real time and looped (``--realtime --loop``), written
to an MPEG-TS recording; all streams of a row run as live jobs of one engine (one worker, so
its batches mix the streams). The ratio column is each row's p50 over passthrough's at the
same stream count: the latency that restoring faces adds.

    python bench/live.py --streams 1 4 8 --seconds 12
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.support, beside bench/

import argparse  # noqa: E402
import logging  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402

from configs import EngineSettings, JobOptions, LiveSettings, WorkerSettings, load_settings  # noqa: E402
from configs.errors import Cancelled  # noqa: E402
from streamer.engine import Engine, worker_weights  # noqa: E402
from streamer.faces.faces_file import read_faces_file  # noqa: E402
from streamer.jobs.live import LiveStream, run_live  # noqa: E402
from tests.support.clips import make_clip  # noqa: E402


class Looped(dict):
    """The clip's faces for frame i of a looped play (frame numbers keep counting up)."""

    def __init__(self, faces: dict, frames: int):
        super().__init__(faces)
        self.frames = frames

    def get(self, index, default=None):
        return super().get(index % self.frames, default)


def run_row(label: str, model: str, faces, streams: int, clip: Path, folder: Path, seconds: float,
            warmup: float) -> dict:
    options = load_settings(JobOptions, overrides={"model": model, "preset": "ultrafast"})
    live = load_settings(LiveSettings)
    worker = worker_weights(load_settings(WorkerSettings), model, None)
    cancel = threading.Event()
    last: dict[int, dict] = {}
    errors: list[BaseException] = []
    with Engine(load_settings(EngineSettings), worker) as engine:
        def one(i: int) -> None:
            stream = LiveStream(str(clip), (str(folder / f"{label}-{streams}-{i}.ts"),), realtime=True, loop=True)
            try:
                run_live(engine, stream, options, live, cancel=cancel, faces_by_frame=faces,
                         progress=lambda p: p.live and last.__setitem__(i, dict(p.live)))
            except Cancelled:
                pass
            except BaseException as exc:  # reported below
                errors.append(exc)

        threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(streams)]
        for t in threads:
            t.start()
        time.sleep(warmup)
        start = {i: dict(s) for i, s in last.items()}
        time.sleep(seconds)
        end = {i: dict(s) for i, s in last.items()}
        cancel.set()
        for t in threads:
            t.join(30)
    if errors:
        raise errors[0]
    rows = [end[i] for i in end]
    frames = sum(s["frames_out"] - start.get(i, {}).get("frames_out", 0) for i, s in end.items())
    hits = [s["hit_rate"] for s in rows if s["hit_rate"] is not None]
    return {"p50": statistics.median(s["latency_p50_ms"] for s in rows if s["latency_p50_ms"] is not None),
            "p99": max(s["latency_p99_ms"] for s in rows if s["latency_p99_ms"] is not None),
            "hit": statistics.mean(hits) if hits else None, "fps_out": frames / seconds / streams,
            "dropped": sum(s.get("dropped", 0) + s.get("dropped_out", 0) for s in rows)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--streams", type=int, nargs="+", default=[1, 4, 8])
    ap.add_argument("--seconds", type=float, default=12.0, help="measured per row, after the warm-up")
    ap.add_argument("--warmup", type=float, default=4.0)
    ap.add_argument("--fps", type=int, default=15)
    ap.add_argument("--size", type=int, nargs=2, default=(320, 240))
    ap.add_argument("--standin", default="standin-30+3ms-256px", help="the GPU-like stand-in restorer")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        clip = make_clip(folder / "face.mp4", frames=3 * args.fps, width=args.size[0], height=args.size[1],
                         fps=args.fps, motion="slow", audio=False)
        faces = Looped(read_faces_file(clip.faces_path), 3 * args.fps)
        none = Looped({}, 3 * args.fps)
        print(f"{args.size[0]}x{args.size[1]} at {args.fps} fps per stream, one face per frame, one worker, "
              f"live.latency_ms default; {args.seconds:g} s measured per row after {args.warmup:g} s")
        print(f"{'restorer':28s} {'streams':>7s} {'p50 ms':>8s} {'p99 ms':>8s} {'p50/pass':>8s} {'hit rate':>8s} "
              f"{'fps out':>8s} {'dropped':>8s}")
        for n in args.streams:
            base = None
            for label, model, f in (("passthrough", "identity", none), ("identity", "identity", faces),
                                    (args.standin, args.standin, faces)):
                r = run_row(label, model, f, n, clip.path, folder, args.seconds, args.warmup)
                base = base or r["p50"]
                hit = "-" if r["hit"] is None or label == "passthrough" else f"{r['hit']:.0%}"
                print(f"{label:28s} {n:7d} {r['p50']:8.1f} {r['p99']:8.1f} {r['p50'] / base:8.2f} {hit:>8s} "
                      f"{r['fps_out']:8.1f} {r['dropped']:8d}", flush=True)


if __name__ == "__main__":
    main()
