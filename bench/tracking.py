"""Tracking between full-frame detections: landmark error per frame and detector time per frame.

Clip (tests.support.clips.make_tracking_clip): 1280x720, one head (face ~200 px, eye distance
90 px) in front of a still photograph; it rests, then turns from side to side (40 degrees of
yaw either way, shifting, tilting and scaling with it) in 8 frames, holding 8 frames in between.

Rows, from one run on the same clip:

  every 1            a full-frame detection on every frame
  every K, flow      full detection every K frames, optical flow carries faces in between; a
                     face the flow cannot follow is not shown and the next frame is detected
  every K, flow (no check)  the same without the flow confidence check (the behaviour before)
  every K, region    full detection every K frames, in between each face is detected again in
                     the region around it (``FaceDetector.detect_region``)

The split between accuracy and cost is explicit. The real RetinaFace weights cannot be had
here, and RetinaFace with deterministic weights finds no real faces, so:

- accuracy: the detector is tests.support.tracking.TruthDetector, the production detector
  geometry answering with the clip's true landmarks plus RetinaFace-like noise (1 px at the
  scale the network sees), only for faces it is shown; the errors measure the tracking,
  under that noise model;
- cost: the real RetinaFace (deterministic weights: its run time does not depend on the
  weight values) through ``FaceDetector.detect_view`` on this clip's inputs: the whole frame
  and the region around the face, alternated (full, region, region, ..., repeated), median
  time of one query of each kind. Time is the process's CPU time with one torch thread: the
  work a query costs, which other processes sharing the machine do not change (wall time
  on a busy 2-core machine swings several-fold); wall-time medians are printed too. A row's
  detector time per frame is its query counts times those medians, over the frames; the
  ratio is to every-1's.

Error: per frame, the mean distance of the five landmarks GPEN is given (after smoothing)
from the truth, in eye distances; "no face": frames where the head is in view and no face was
shown near it.

    python bench/tracking.py                       # ResNet-50 and MobileNet-0.25, K = 5
    python bench/tracking.py --nets mobile0.25 --frames 40
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.support, beside bench/

import argparse
import contextlib
import tempfile
import time
import warnings

import numpy as np
import torch

from streamer.faces import track
from streamer.faces.detect import REGION_SIDE_PX, REGION_THRESHOLD, FaceDetector, View
from tests.support.clips import Head, make_tracking_clip, read_frames
from tests.support.tracking import TruthDetector, head_errors, track_clip

NETS = {"resnet50": "ResNet-50", "mobile0.25": "MobileNet-0.25"}


@contextlib.contextmanager
def without_flow_check():
    """The flow as it was before its confidence check (for the comparison row only)."""
    saved = track.FLOW_MIN_AGREEMENT, track.FLOW_FB_MAX_PX
    track.FLOW_MIN_AGREEMENT, track.FLOW_FB_MAX_PX = 0.0, np.inf
    try:
        yield
    finally:
        track.FLOW_MIN_AGREEMENT, track.FLOW_FB_MAX_PX = saved


def retinaface(network: str) -> torch.nn.Module:
    from facexlib.detection.retinaface import RetinaFace

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return RetinaFace(network_name=network, half=False, phase="test", device="cpu").eval()


def run(clip, every: int, mode: str, region_side: int) -> dict:
    """One row: the landmark errors and how many queries of each kind it made."""
    detector = TruthDetector(clip, region_side=region_side)
    guard = without_flow_check() if mode == "flow (no check)" else contextlib.nullcontext()
    with guard:
        tracked = track_clip(clip, detector, detect_every=every, regions=mode.startswith("region"))
    result = head_errors(clip, tracked.shown)[0]
    return {"errors": result.values(), "missed": len(result.missed), "full": detector.cost["full"].calls,
            "regions": detector.cost["region"].calls, "side": region_side}


def query_seconds(clip, net, sides: list[int], repeats: int) -> tuple[dict, dict]:
    """Median CPU and wall seconds of one query, by (kind, region side): the real network on
    the clip's frames, the kinds alternated."""
    frames = read_frames(clip.path)[0]
    detector = FaceDetector(net)
    cpu: dict = {}
    wall: dict = {}
    for k in range(repeats):
        t = k * len(frames) // repeats
        box = TruthDetector(clip).detect(frames[t])[0].box  # where the face is: the region the tracker would search
        views = {("full", 0): (View.whole(clip.width, clip.height, 0, detector.max_side), detector.threshold)}
        views |= {("region", side): (View.around(box, clip.width, clip.height, 0, track.REGION_MARGIN, side),
                                     REGION_THRESHOLD) for side in sides}
        for key, (view, threshold) in views.items():
            started, started_cpu = time.perf_counter(), time.process_time()
            detector.detect_view(frames[t], view, threshold)
            cpu.setdefault(key, []).append(time.process_time() - started_cpu)
            wall.setdefault(key, []).append(time.perf_counter() - started)
    return ({key: float(np.median(s)) for key, s in cpu.items()},
            {key: float(np.median(s)) for key, s in wall.items()})


def ms_per_frame(row: dict, seconds: dict, frames: int) -> float:
    return (row["full"] * seconds[("full", 0)] + row["regions"] * seconds[("region", row["side"])]) / frames * 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nets", nargs="+", default=list(NETS), choices=list(NETS))
    ap.add_argument("--every", type=int, default=5)
    ap.add_argument("--frames", type=int, default=60)
    ap.add_argument("--size", type=int, nargs=2, default=[1280, 720], metavar=("W", "H"))
    ap.add_argument("--face-px", type=float, default=200.0)
    ap.add_argument("--region-sides", type=int, nargs="+", default=[REGION_SIDE_PX, 192, 256],
                    help="network side of a region (px); the first is the default, others show the trade-off")
    ap.add_argument("--repeats", type=int, default=9, help="timed queries of each kind (alternated)")
    args = ap.parse_args()
    torch.set_num_threads(1)  # CPU time then measures a query's work (see the docstring)
    tmp = Path(tempfile.mkdtemp(prefix="gpen-tracking-"))
    clip = make_tracking_clip(tmp / "turn.mp4", [Head("turn", face_px=args.face_px, start=8)], frames=args.frames,
                              width=args.size[0], height=args.size[1])
    print(f"{args.frames} frames {args.size[0]}x{args.size[1]}, face ~{args.face_px:.0f}px (eye distance "
          f"{args.face_px * 0.45:.0f}px facing the camera), torch threads {torch.get_num_threads()}")
    rows = [(1, "full", REGION_SIDE_PX), (args.every, "flow", REGION_SIDE_PX),
            (args.every, "flow (no check)", REGION_SIDE_PX)]
    rows += [(args.every, f"region {side}px", side) for side in args.region_sides]
    measured = [run(clip, every, mode, side) for every, mode, side in rows]
    seconds, wall = {}, {}
    for name in args.nets:
        seconds[name], wall[name] = query_seconds(clip, retinaface(name), args.region_sides, args.repeats)
    header = "| rows | error mean | p95 | max | no face | full | regions |"
    header += "".join(f" {NETS[n]} CPU ms/frame | ratio |" for n in args.nets)
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for (every, mode, _), row in zip(rows, measured):
        e = row["errors"]
        label = "every 1" if every == 1 else f"every {every}, {mode}"
        line = (f"| {label} | {e.mean():.3f} | {np.percentile(e, 95):.3f} | {e.max():.3f} | {row['missed']} "
                f"| {row['full']} | {row['regions']} |")
        for name in args.nets:
            ms, baseline = (ms_per_frame(r, seconds[name], args.frames) for r in (row, measured[0]))
            line += f" {ms:.1f} | {ms / baseline:.2f} |"
        print(line)
    for name in args.nets:
        per_query = ", ".join(f"{kind}{f' {side}px' if side else ''} {s * 1000:.1f} ms (wall {wall[name][key] * 1000:.1f})"
                              for key, s in seconds[name].items() for kind, side in [key])
        print(f"{NETS[name]}, median of {args.repeats} per query, CPU: {per_query}")


if __name__ == "__main__":
    main()
