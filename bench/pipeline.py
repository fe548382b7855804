"""End-to-end pipeline benchmarks; every figure is a ratio measured in one run.

overhead   a clip without faces through ``restore`` (an empty --faces file, so no detection)
           vs a plain PyAV transcode with the same encoder settings; also the detector's cost
           per frame, reported on its own.
speedup    ``restore`` vs a naive per-frame loop, as GPEN's/GFPGAN's/CodeFormer's image scripts
           work: decode a frame, restore its faces one at a time, paste each back over the whole
           frame, encode. Same clip, same precomputed faces, same GPEN weights (deterministic,
           official layout), same device, dtype and encoder settings. The loop runs twice: with
           the official formulation of the network (what GPEN's scripts run) and with ours, so
           the pipeline's own share of the gain is visible.

jobs       ten short jobs through one long-lived engine (the daemon's way: detector and model
           loaded once) vs ten ``restore_file`` calls (each builds its own engine, as a
           ``gpen-stream restore`` process does). Same clips, GPEN-BFR-256 with deterministic
           weights and RetinaFace MobileNet with deterministic weights, so both loads are real.

    python bench/pipeline.py overhead --frames 150
    python bench/pipeline.py speedup --frames 40
    python bench/pipeline.py jobs --jobs 10 --frames 8
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.support, beside bench/

import argparse
import logging
import tempfile
import time
from pathlib import Path

import av
import cv2
import numpy as np
import torch

from configs import JobOptions, WorkerSettings, load_settings
from gpen import RELEASED_CONFIGS, load_generator
from tests.support.reference import reference_forward
from gpen.testing import deterministic_state_dict
from streamer.faces.align import alignment, invert
from streamer.composite import crop_mask
from streamer.jobs.restore import restore_file
from tests.support.clips import make_clip
from workers import metrics

ENCODER = {"codec": "libx264", "crf": 18, "preset": "veryfast"}


def _plain_transcode(src: Path, dst: Path) -> float:
    """Decode, re-encode with the same settings, copy audio: what any transcode costs."""
    started = time.perf_counter()
    with av.open(str(src)) as inp, av.open(str(dst), "w") as out:
        iv = inp.streams.video[0]
        iv.thread_type = "AUTO"
        ov = out.add_stream(ENCODER["codec"], rate=iv.average_rate,
                            options={"crf": str(ENCODER["crf"]), "preset": ENCODER["preset"]})
        ov.width, ov.height, ov.pix_fmt, ov.time_base = iv.width, iv.height, iv.codec_context.pix_fmt, iv.time_base
        audio = [s for s in inp.streams if s.type == "audio"]
        oa = {s.index: out.add_stream_from_template(s) for s in audio}
        for packet in inp.demux(iv, *audio):
            if packet.stream is iv:
                for frame in packet.decode():
                    frame.pict_type = av.video.frame.PictureType.NONE
                    for p in ov.encode(frame):
                        out.mux(p)
            elif packet.dts is not None:
                packet.stream = oa[packet.stream.index]
                out.mux(packet)
        for p in ov.encode(None):
            out.mux(p)
    return time.perf_counter() - started


def _settings(**overrides) -> JobOptions:
    return load_settings(JobOptions, overrides={**ENCODER, **overrides})


def overhead(args, tmp: Path) -> None:
    clip = make_clip(tmp / "noface.mp4", frames=args.frames, width=args.size[0], height=args.size[1],
                     face_px=args.size[1] / 4, crf=10)
    empty = tmp / "none.jsonl"
    empty.write_text("")
    ours, plain = [], []
    for _ in range(args.repeats):  # alternate so drift hits both
        plain.append(_plain_transcode(clip.path, tmp / "plain.mp4"))
        started = time.perf_counter()
        result = restore_file(clip.path, tmp / "ours.mp4", _settings(model="identity"),
                              load_settings(WorkerSettings), faces_file=empty)
        ours.append(time.perf_counter() - started)
    o, p = min(ours), min(plain)
    print(f"clip {args.frames} frames {args.size[0]}x{args.size[1]}, {ENCODER}, best of {args.repeats}")
    print(f"plain PyAV transcode   {args.frames / p:7.1f} fps")
    print(f"gpen-stream restore    {args.frames / o:7.1f} fps   (no faces; stage busy s: "
          f"{ {k: round(v, 2) for k, v in result.timings.items()} })")
    print(f"fps ratio restore/plain = {p / o:.3f}")
    _detector_cost(clip, args)


def _detector_cost(clip, args) -> None:
    import warnings

    from facexlib.detection.retinaface import RetinaFace

    from streamer.faces.detect import FaceDetector

    frame = next(av.open(str(clip.path)).decode(video=0)).to_ndarray(format="rgb24")
    for network, name in (("resnet50", "retinaface_resnet50"), ("mobile0.25", "retinaface_mobile0.25")):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            net = RetinaFace(network_name=network, half=False, phase="test", device="cpu").eval()
        detector = FaceDetector(net, threshold=0.99, max_side=1280)  # deterministic init: speed, not accuracy
        detector.detect(frame)
        started = time.perf_counter()
        for _ in range(3):
            detector.detect(frame)
        print(f"detector {name:<22} {(time.perf_counter() - started) / 3 * 1000:7.1f} ms/frame at "
              f"{frame.shape[1]}x{frame.shape[0]} (long side <= 1280)")


def _naive_loop(clip, faces_by_frame: dict, weights: Path, out: Path, timings: dict, official: bool) -> float:
    """One frame at a time, one face at a time, whole-frame paste: the image scripts' way."""
    model = load_generator(weights)
    size = model.config.size
    network = (lambda x: reference_forward(model, x)) if official else model
    mask = crop_mask(size, 0.05, 0.04)
    started = time.perf_counter()

    def tick(stage, t0):
        timings[stage] = timings.get(stage, 0.0) + time.perf_counter() - t0

    with av.open(str(clip.path)) as inp, av.open(str(out), "w") as dst:
        iv = inp.streams.video[0]
        ov = dst.add_stream(ENCODER["codec"], rate=iv.average_rate,
                            options={"crf": str(ENCODER["crf"]), "preset": ENCODER["preset"]})
        ov.width, ov.height, ov.pix_fmt, ov.time_base = iv.width, iv.height, "yuv420p", iv.time_base
        frames = inp.decode(iv)
        index = 0
        while True:
            t0 = time.perf_counter()
            frame = next(frames, None)
            if frame is None:
                break
            img = frame.to_ndarray(format="rgb24").astype(np.float32)
            tick("decode", t0)
            h, w = img.shape[:2]
            for landmarks in faces_by_frame.get(index, []):
                t0 = time.perf_counter()
                affine = alignment(landmarks, size)
                crop = cv2.warpAffine(img, affine, (size, size), flags=cv2.INTER_LINEAR)
                tick("align", t0)
                t0 = time.perf_counter()
                with torch.inference_mode():
                    x = torch.from_numpy(crop).permute(2, 0, 1)[None] / 127.5 - 1
                    y = network(x)[0].clamp(-1, 1).permute(1, 2, 0).numpy()
                restored = (y + 1) * 127.5
                tick("model", t0)
                t0 = time.perf_counter()
                inv = invert(affine)
                face = cv2.warpAffine(restored, inv, (w, h), flags=cv2.INTER_LINEAR)
                alpha = cv2.warpAffine(mask, inv, (w, h), flags=cv2.INTER_LINEAR)[:, :, None]
                img = img * (1 - alpha) + face * alpha
                tick("paste", t0)
            t0 = time.perf_counter()
            out_frame = av.VideoFrame.from_ndarray(np.clip(img + 0.5, 0, 255).astype(np.uint8), format="rgb24")
            out_frame.pts, out_frame.time_base = frame.pts, frame.time_base
            for p in ov.encode(out_frame):
                dst.mux(p)
            tick("encode", t0)
            index += 1
        for p in ov.encode(None):
            dst.mux(p)
    return time.perf_counter() - started


def speedup(args, tmp: Path) -> None:
    import json

    weights = tmp / "GPEN-BFR-256-deterministic.pth"
    torch.save(deterministic_state_dict(RELEASED_CONFIGS["GPEN-BFR-256"]), weights)
    clip = make_clip(tmp / "faces.mp4", frames=args.frames, width=args.size[0], height=args.size[1],
                     face_px=args.size[1] / 4, motion="slow", crf=10)
    faces_by_frame = {}
    for line in clip.faces_path.read_text().splitlines():
        record = json.loads(line)
        faces_by_frame[record["frame"]] = [np.array(f["landmarks"]) for f in record["faces"]]
    times: dict[str, list[float]] = {"official": [], "ours": [], "restore": []}
    breakdown: dict[str, dict] = {}
    for _ in range(args.repeats):  # alternate so drift hits all alike
        for name in ("official", "ours"):
            breakdown[name] = {}
            times[name].append(_naive_loop(clip, faces_by_frame, weights, tmp / "naive.mp4", breakdown[name],
                                           official=name == "official"))
        model_s = metrics.MODEL_SECONDS.labels(model="GPEN-BFR-256")._sum.get()
        started = time.perf_counter()
        result = restore_file(clip.path, tmp / "ours.mp4",
                              _settings(model="GPEN-BFR-256", temporal=args.temporal),
                              load_settings(WorkerSettings, overrides={"batch": args.batch,
                                                                       "models": {"GPEN-BFR-256": weights}}),
                              faces_file=clip.faces_path)
        times["restore"].append(time.perf_counter() - started)
        result.timings["worker model"] = metrics.MODEL_SECONDS.labels(model="GPEN-BFR-256")._sum.get() - model_s
    best = {k: min(v) for k, v in times.items()}
    print(f"clip {args.frames} frames {args.size[0]}x{args.size[1]}, 1 face/frame, GPEN-BFR-256 fp32 on "
          f"{'cuda' if torch.cuda.is_available() else 'cpu'} ({torch.get_num_threads()} threads), {ENCODER}, "
          f"best of {args.repeats}")
    for name, label in (("official", "naive loop, official network"), ("ours", "naive loop, our network")):
        print(f"{label:<30} {args.frames / best[name]:6.2f} fps   busy s: "
              f"{ {k: round(v, 2) for k, v in breakdown[name].items()} }")
    print(f"{'gpen-stream restore':<30} {args.frames / best['restore']:6.2f} fps   stage busy s: "
          f"{ {k: round(v, 2) for k, v in result.timings.items()} }  (batch {args.batch}, temporal {args.temporal})")
    print(f"speed-up restore / naive loop with the official network = {best['official'] / best['restore']:.2f}x")
    print(f"speed-up restore / naive loop with our network          = {best['ours'] / best['restore']:.2f}x")


def jobs(args, tmp: Path) -> None:
    import warnings

    from facexlib.detection.retinaface import RetinaFace

    from configs import EngineSettings
    from streamer.engine import Engine

    weights = tmp / "GPEN-BFR-256-deterministic.pth"
    torch.save(deterministic_state_dict(RELEASED_CONFIGS["GPEN-BFR-256"]), weights)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        net = RetinaFace(network_name="mobile0.25", half=False, phase="test", device="cpu")
    detector = tmp / "detection_mobilenet0.25_Final.pth"
    torch.save(net.state_dict(), detector)
    clip = make_clip(tmp / "short.mp4", frames=args.frames, width=args.size[0], height=args.size[1],
                     face_px=args.size[1] / 4, motion="slow", crf=10)
    from streamer.faces.detect import FaceDetector

    # the deterministic detector finds "faces" at random places: a threshold that keeps the best one
    first = next(av.open(str(clip.path)).decode(video=0)).to_ndarray(format="rgb24")
    best_score = max(f.score for f in FaceDetector(net.eval(), threshold=0.01, max_side=640).detect(first))
    options = _settings(model="GPEN-BFR-256", detector="retinaface_mobile0.25", detect_threshold=best_score * 0.999,
                        detect_max_side=640, max_faces=1, min_face=0)
    worker = load_settings(WorkerSettings, overrides={"batch": args.batch, "models": {"GPEN-BFR-256": weights}})
    engine_settings = load_settings(EngineSettings, overrides={"detector_weights": detector})
    times: dict[str, list[float]] = {"engine": [], "calls": []}
    faces = {}
    for _ in range(args.repeats):
        started = time.perf_counter()
        with Engine(engine_settings, worker) as engine:
            faces["engine"] = sum(restore_file(clip.path, tmp / f"e{i}.mp4", options, engine=engine).faces
                                  for i in range(args.jobs))
        times["engine"].append(time.perf_counter() - started)
        started = time.perf_counter()
        faces["calls"] = sum(restore_file(clip.path, tmp / f"c{i}.mp4", options, worker, engine_settings=engine_settings)
                             .faces for i in range(args.jobs))
        times["calls"].append(time.perf_counter() - started)
    best = {k: min(v) for k, v in times.items()}
    print(f"{args.jobs} jobs of {args.frames} frames {args.size[0]}x{args.size[1]}, GPEN-BFR-256 + RetinaFace "
          f"MobileNet (deterministic weights), {faces['engine']} faces in all, best of {args.repeats}")
    print(f"one engine, {args.jobs} jobs        {best['engine']:7.2f} s  ({best['engine'] / args.jobs:.2f} s/job)")
    print(f"{args.jobs} restore_file calls     {best['calls']:7.2f} s  ({best['calls'] / args.jobs:.2f} s/job)")
    print(f"speed-up one engine / separate calls = {best['calls'] / best['engine']:.2f}x  "
          f"(faces {faces['engine']} vs {faces['calls']})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("which", choices=["overhead", "speedup", "jobs"])
    ap.add_argument("--jobs", type=int, default=10)
    ap.add_argument("--frames", type=int, default=None)
    ap.add_argument("--size", type=int, nargs=2, default=[1280, 720], metavar=("W", "H"))
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--temporal", default="full", choices=["auto", "off", "landmarks", "full"])
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    args.frames = args.frames or {"overhead": 150, "speedup": 40, "jobs": 8}[args.which]
    with tempfile.TemporaryDirectory(prefix="gpen-bench-") as tmp:
        {"overhead": overhead, "speedup": speedup, "jobs": jobs}[args.which](args, Path(tmp))


if __name__ == "__main__":
    main()
