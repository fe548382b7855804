"""Temporal stability on generated clips with ground truth: ``--temporal off`` vs ``full``.

Clips (tests.support.clips): a static face, slow motion, fast motion, a scene cut, a hand-like
occluder sweeping over the face. Every frame is degraded independently (noise, blur, JPEG) and
the ``--faces`` landmarks carry ~1.5 px of jitter. For each clip and restorer (the identity
restorer, where fidelity is meaningful, and GPEN-BFR-256 with deterministic weights) it
reports, from one run of each mode on the same input:

  TE    mean over frames and face pixels of |(out_t - out_t-1) - (gt_t - gt_t-1)|  (0..255)
  TE*   the same with gt replaced by the restorer's own output on the clean clip (exact
        landmarks, temporal off): the flicker the degradations cause. With random weights GPEN
        does not output a face, so on moving clips plain TE mostly measures how its texture
        differs from the moving ground truth; TE* still measures stability.
  PSNR  face-region PSNR of the output against the clean ground truth (dB)
  time  end-to-end wall time of the restore

and, for the cut clip, the largest difference between the first frame after the cut and the
same frame restored from a clip that starts at the cut (0 = nothing carried over). Both runs
use batch 1: how crops are batched moves GPEN's output by a rounding step, which would hide
the comparison.

    python bench/temporal.py                  # all clips, identity and GPEN-BFR-256
    python bench/temporal.py --models identity --frames 24
    python bench/temporal.py --blender reference   # the same with the OpenCV/ECC blender it replaced
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.support, beside bench/

import argparse
import json
import tempfile
import time
from pathlib import Path

import av
import numpy as np
import torch

from configs import JobOptions, WorkerSettings, load_settings
from gpen import RELEASED_CONFIGS
from gpen.testing import deterministic_state_dict
from streamer.jobs.restore import restore_file
from tests.support.clips import TEMPORAL_CLIPS as CLIPS
from tests.support.clips import TEMPORAL_DEGRADE as DEGRADE
from tests.support.clips import face_psnr, make_clip, read_frames, temporal_error



def run(clip, out: Path, model: str, weights: Path | None, temporal: str, faces: Path | None = None,
        batch: int | None = None):
    settings = load_settings(JobOptions, overrides={"model": model, "temporal": temporal, "crf": 0})
    worker = load_settings(WorkerSettings, overrides={"batch": batch, "models": {model: weights} if weights else None})
    started = time.perf_counter()
    restore_file(clip.path if faces is None else clip, out, settings, worker,
                 faces_file=clip.faces_path if faces is None else faces)
    elapsed = time.perf_counter() - started
    frames, *_ = read_frames(out)
    return frames, elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clips", nargs="+", default=list(CLIPS), choices=list(CLIPS))
    ap.add_argument("--models", nargs="+", default=["identity", "GPEN-BFR-256"])
    ap.add_argument("--frames", type=int, default=40)
    ap.add_argument("--blender", choices=["tensor", "reference"], default="tensor",
                    help="reference: workers.temporal_reference, the blender the tensor one replaced")
    ap.add_argument("--size", type=int, nargs=2, default=[320, 240], metavar=("W", "H"))
    ap.add_argument("--face-px", type=float, default=110.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--modes", nargs=2, default=["off", "full"], metavar=("BASE", "MODE"),
                    help="the two --temporal modes compared (default: off full)")
    args = ap.parse_args()
    if args.blender == "reference":
        import workers.build
        from workers.temporal_reference import ReferenceBlender

        workers.build.TemporalBlender = ReferenceBlender  # what the embedded worker is built with
    tmp = Path(tempfile.mkdtemp(prefix="gpen-temporal-"))
    weights = {}
    if "GPEN-BFR-256" in args.models:
        weights["GPEN-BFR-256"] = tmp / "GPEN-BFR-256-deterministic.pth"
        torch.save(deterministic_state_dict(RELEASED_CONFIGS["GPEN-BFR-256"]), weights["GPEN-BFR-256"])
    print(f"{args.frames} frames {args.size[0]}x{args.size[1]}, face ~{args.face_px:.0f}px, degradations {DEGRADE}, "
          f"{args.blender} blender")
    print(f"{'clip':<10}{'model':<14}{'TE off':>8}{'TE full':>9}{'ratio':>7}{'TE* off':>9}{'TE* full':>9}{'ratio':>7}"
          f"{'PSNR off':>10}{'PSNR full':>10}{'dPSNR':>7}{'t off':>7}{'t full':>7}{'t ratio':>8}  notes")
    for name in args.clips:
        opts = dict(CLIPS[name])
        cut_at = opts.pop("cut_at", None)
        cut = int(args.frames * cut_at) if cut_at else None
        shape = dict(frames=args.frames, width=args.size[0], height=args.size[1], face_px=args.face_px, cut_at=cut,
                     seed=args.seed, **opts)
        clip = make_clip(tmp / f"{name}.mp4", **shape, **DEGRADE)
        clean = make_clip(tmp / f"{name}-clean.mp4", **shape)
        skip = {cut} if cut else set()
        for model in args.models:
            reference, _ = run(clean, tmp / f"{name}-{model}-clean.mp4", model, weights.get(model), "off")
            results = {}
            for mode in args.modes:
                frames, elapsed = run(clip, tmp / f"{name}-{model}-{mode}.mp4", model, weights.get(model), mode)
                results[mode] = (temporal_error(frames, clip.clean, clip, skip), face_psnr(frames, clip.clean, clip),
                                 elapsed, frames, temporal_error(frames, reference, clip, skip))
            note = ""
            if cut:
                note = _carry_over(clip, cut, args.modes[1], tmp, model, weights.get(model))
            (te0, p0, t0, _, r0), (te1, p1, t1, _, r1) = results[args.modes[0]], results[args.modes[1]]
            print(f"{name:<10}{model:<14}{te0:>8.2f}{te1:>9.2f}{te1 / te0:>7.2f}{r0:>9.2f}{r1:>9.2f}{r1 / r0:>7.2f}"
                  f"{p0:>10.2f}{p1:>10.2f}{p1 - p0:>+7.2f}{t0:>7.1f}{t1:>7.1f}{t1 / t0:>8.2f}  {note}", flush=True)


def _carry_over(clip, cut: int, mode: str, tmp: Path, model: str, weights) -> str:
    """Restore the whole clip and only the frames from the cut on; compare the cut frame."""
    whole, _ = run(clip, tmp / "whole-b1.mp4", model, weights, mode, batch=1)
    trimmed = tmp / "from-cut.mp4"
    with av.open(str(clip.path)) as src, av.open(str(trimmed), "w") as dst:
        v = src.streams.video[0]
        out = dst.add_stream("libx264", rate=v.average_rate, options={"crf": "0"})
        out.width, out.height, out.pix_fmt, out.time_base = v.width, v.height, "yuv420p", v.time_base
        for k, frame in enumerate(src.decode(v)):
            if k >= cut:
                frame.pict_type = av.video.frame.PictureType.NONE
                for p in out.encode(frame):
                    dst.mux(p)
        for p in out.encode(None):
            dst.mux(p)
    faces = tmp / "from-cut.faces.jsonl"
    with open(clip.faces_path) as f, open(faces, "w") as g:
        for line in f:
            rec = json.loads(line)
            if rec["frame"] >= cut:
                rec["frame"] -= cut
                g.write(json.dumps(rec) + "\n")
    fresh, _ = run(trimmed, tmp / "from-cut-out.mp4", model, weights, mode, faces=faces, batch=1)
    diff = int(np.abs(fresh[0].astype(int) - whole[cut].astype(int)).max())
    return f"first frame after cut vs fresh start: max|diff| {diff}"


if __name__ == "__main__":
    main()
