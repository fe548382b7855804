"""gpen-stream's command line. A thin layer: every command calls the Python API."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path

from configs import RestoreSettings, SettingsError, WorkerSettings, load_settings

log = logging.getLogger("gpen-stream")

EXIT_FAILED, EXIT_USAGE, EXIT_CANCELLED = 1, 2, 130

DESCRIPTION = """\
Restore faces in videos with GPEN.

  gpen-stream restore in.mp4 -o out.mp4          restore a file (weights fetched on first use)
  gpen-stream models list                        which model files are cached, and their licences
  gpen-stream worker --endpoint tcp://0.0.0.0:5555 --model GPEN-BFR-512
                                                 serve a model to decoders on other machines

GPEN's released weights are for non-commercial use only.
Settings: defaults < --config FILE < GPEN_STREAM_<SECTION>_<KEY> variables < flags.
"""

RESTORE_EPILOG = """\
Timestamps, frame rate, rotation and colour metadata are kept; audio, subtitle and data
streams are copied unchanged. The output is written to a temporary file beside OUTPUT and
renamed only when complete. Frames that cannot be decoded are skipped and counted (or fail
the job with --corrupt-frames fail); a truncated input always fails.

--faces FILE takes JSON Lines, one object per frame with faces:
  {"frame": 0, "faces": [{"landmarks": [[x,y] x5], "box": [x0,y0,x1,y1], "score": 0.99}]}
(0-based decode-order frame index; RetinaFace landmark order: left eye, right eye, nose,
left and right mouth corners; pixels of the displayed frame). --dump-faces writes the same
format, with track ids, for the faces gpen-stream found.
"""


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE", help="YAML settings file (sections: restore, worker)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.add_argument("--log-format", default="text", choices=["text", "json"], help="json: one object per line")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gpen-stream", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    r = sub.add_parser("restore", help="restore the faces in a video file", description=RESTORE_EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    r.add_argument("input", type=Path, help="video file to read")
    r.add_argument("-o", "--output", type=Path, required=True, help="file to write (.mp4, .mkv, .mov)")
    r.add_argument("--model", help="GPEN-BFR-256|512|1024|2048 (default 512), or identity: detect, align "
                                   "and paste back the unchanged crops (a diagnostic)")
    r.add_argument("--weights", type=Path, help="use this GPEN checkpoint instead of the cached release")
    r.add_argument("--detector", choices=["retinaface_resnet50", "retinaface_mobile0.25"])
    r.add_argument("--detector-weights", type=Path, help="a RetinaFace checkpoint instead of the cached release")
    r.add_argument("--detect-every", type=int, metavar="K", help="detect every K frames, track in between")
    r.add_argument("--faces", type=Path, metavar="FILE", help="precomputed faces (JSON Lines, see below)")
    r.add_argument("--dump-faces", type=Path, metavar="FILE", help="write the faces used, as JSON Lines")
    r.add_argument("--device", help="auto|cpu|cuda|cuda:N (default auto)")
    r.add_argument("--dtype", choices=["auto", "fp32", "fp16", "bf16"],
                   help="model precision (auto: fp16 on CUDA, fp32 on CPU)")
    r.add_argument("--workers", type=int, metavar="N", help="inference workers (default: one per GPU, or 1)")
    r.add_argument("--isolate-workers", action="store_true", default=None,
                   help="run even a single worker in its own process")
    r.add_argument("--connect", action="append", metavar="ENDPOINT",
                   help="use a running worker (gpen-stream worker --endpoint ...) instead of starting one; repeatable")
    r.add_argument("--batch", type=int, metavar="B", help="crops per model call (default 4)")
    r.add_argument("--temporal", choices=["off", "landmarks", "full"],
                   help="flicker reduction: landmark smoothing, plus blending with the previous face (full)")
    r.add_argument("--strength", type=float, help="0..1: how much of the restored face to use (default 1)")
    r.add_argument("--mask", choices=["feather", "parse"],
                   help="paste mask: a feathered square (default) or face parsing with ParseNet (hair, ears and "
                        "neck follow the face; ~3 s per face on CPU, fast on CUDA)")
    r.add_argument("--parser-weights", type=Path, help="a ParseNet checkpoint instead of the cached one")
    r.add_argument("--no-color-match", dest="color_match", action="store_false", default=None,
                   help="keep GPEN's colours instead of matching the input's mean colour")
    r.add_argument("--codec", help="video encoder (default libx264)")
    r.add_argument("--crf", type=float, help="encoder quality, lower is better (default 18)")
    r.add_argument("--preset", help="encoder speed preset (default medium)")
    r.add_argument("--corrupt-frames", choices=["skip", "fail"], help="undecodable frames: skip and count, or fail")
    r.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    r.add_argument("--json-progress", action="store_true",
                   help="print one JSON progress line per second on stdout (and a final summary)")
    _add_common(r)

    m = sub.add_parser("models", help="list, download, verify or locate model files")
    m.add_argument("action", choices=["list", "download", "verify", "path"])
    m.add_argument("names", nargs="*", help="model names (default: GPEN-BFR-512 and retinaface_resnet50 for "
                                            "download; every file for list and verify)")
    _add_common(m)

    w = sub.add_parser("worker", help="serve a model to decoders over ZeroMQ")
    w.add_argument("--endpoint", help="address to bind, e.g. tcp://0.0.0.0:5555 or ipc:///run/gpen.sock")
    w.add_argument("--model", action="append", required=True, help="model to serve (repeatable)")
    w.add_argument("--weights", type=Path, help="checkpoint for the (single) model instead of the cache")
    w.add_argument("--device", help="auto|cpu|cuda|cuda:N")
    w.add_argument("--dtype", choices=["auto", "fp32", "fp16", "bf16"])
    w.add_argument("--batch", type=int)
    w.add_argument("--parent-pid", type=int, help=argparse.SUPPRESS)  # embedded workers die with their decoder
    _add_common(w)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from streamer import logs

    logs.setup(args.log_level, args.log_format)
    try:
        return {"restore": _restore, "models": _models, "worker": _worker}[args.command](args)
    except SettingsError as exc:
        log.error("%s", exc)
        return EXIT_USAGE
    except Exception as exc:  # a command failed in a way it did not foresee: one line, no traceback
        log.error("failed: %s: %s (run with --log-level debug for details)", type(exc).__name__, exc)
        log.debug("traceback", exc_info=True)
        return EXIT_FAILED


# ---------------------------------------------------------------------- restore


def _restore(args) -> int:
    from gpen.checkpoint import CheckpointError
    from gpen.weights import WeightsError
    from streamer.faces.detect import DetectorUnavailable
    from streamer.dispatch import DispatchError
    from streamer.faces.faces_file import FacesFileError
    from streamer.io.probe import MediaError
    from streamer.faces.parse import ParserUnavailable
    from streamer.pipeline import RestoreCancelled, restore_file
    from workers.restorers import ModelUnavailable

    settings = load_settings(RestoreSettings, config_file=args.config, overrides={
        "model": args.model, "weights": args.weights, "detector": args.detector,
        "detector_weights": args.detector_weights, "detect_every": args.detect_every,
        "workers": args.workers, "isolate_workers": args.isolate_workers, "connect": args.connect,
        "temporal": args.temporal,
        "strength": args.strength, "color_match": args.color_match, "mask": args.mask,
        "parser_weights": args.parser_weights, "codec": args.codec, "crf": args.crf,
        "preset": args.preset, "corrupt_frames": args.corrupt_frames})
    worker = load_settings(WorkerSettings, config_file=args.config, overrides={
        "device": args.device, "dtype": args.dtype, "batch": args.batch})
    def interrupted(signum, _frame):
        # Raised in the main thread wherever it is: restore_file stops its threads and removes
        # the partial output on the way out.
        raise RestoreCancelled(f"interrupted by {signal.Signals(signum).name}")

    signal.signal(signal.SIGTERM, interrupted)
    signal.signal(signal.SIGINT, interrupted)
    reporter = _ProgressReporter(quiet=args.quiet, json_lines=args.json_progress)
    try:
        result = restore_file(args.input, args.output, settings, worker, faces_file=args.faces,
                              dump_faces=args.dump_faces, progress=reporter)
    except RestoreCancelled as exc:
        reporter.close()
        reporter.emit({"event": "cancelled"})
        log.error("%s; no output written", exc)
        return EXIT_CANCELLED
    except (MediaError, WeightsError, CheckpointError, ModelUnavailable, DetectorUnavailable, ParserUnavailable,
            DispatchError, FacesFileError, SettingsError) as exc:
        reporter.close()
        reporter.emit({"event": "failed", "error": str(exc)})
        log.error("%s", exc)
        return EXIT_FAILED
    except Exception as exc:  # anything else: one clear line, the traceback only when asked for
        reporter.close()
        reporter.emit({"event": "failed", "error": f"{type(exc).__name__}: {exc}"})
        log.error("failed: %s: %s (run with --log-level debug for details)", type(exc).__name__, exc)
        log.debug("traceback", exc_info=True)
        return EXIT_FAILED
    reporter.close()
    summary = {"event": "done", "output": str(result.output), "frames": result.frames, "faces": result.faces,
               "corrupt_frames": result.corrupt_frames, "elapsed_s": round(result.elapsed_s, 3),
               "fps": round(result.fps, 3)}
    reporter.emit(summary)
    note = f", {result.corrupt_frames} undecodable frames skipped" if result.corrupt_frames else ""
    log.info("wrote %s: %d frames, %d faces restored in %.1f s (%.2f fps)%s", result.output, result.frames,
             result.faces, result.elapsed_s, result.fps, note)
    return 0


class _ProgressReporter:
    """A tqdm bar on stderr (fps, ETA) and/or JSON lines on stdout, once per second."""

    def __init__(self, *, quiet: bool, json_lines: bool):
        self.json_lines = json_lines
        self._bar = None
        self._quiet = quiet
        self._last_json = 0.0

    def __call__(self, p) -> None:
        if not self._quiet:
            self._update_bar(p)
        now = time.monotonic()
        if self.json_lines and now - self._last_json >= 1.0:
            self._last_json = now
            self.emit({"event": "progress", "frames_done": p.frames_done, "frames_total": p.frames_total,
                       "progress": None if p.fraction is None else round(p.fraction, 4), "fps": round(p.fps, 3),
                       "eta_s": None if p.eta_s is None else round(p.eta_s, 1), "elapsed_s": round(p.elapsed_s, 1)})

    def _update_bar(self, p) -> None:
        if self._bar is None:
            from tqdm import tqdm

            self._bar = tqdm(total=p.frames_total or None, unit="frame", dynamic_ncols=True, file=sys.stderr,
                             disable=None)
        self._bar.update(p.frames_done - self._bar.n)

    def emit(self, obj: dict) -> None:
        if self.json_lines:
            try:
                print(json.dumps(obj), flush=True)
            except BrokenPipeError:  # the reader went away (e.g. `| head`): keep working, stop printing
                self.json_lines = False
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


# ---------------------------------------------------------------------- models


def _models(args) -> int:
    from gpen import weights as store

    if args.action == "list":
        print(f"model files in {store.models_dir()}")
        print(f"{'name':<24}{'file':<36}{'size':>10}  {'sha-256':<9} status")
        for w in store.CATALOG.values():
            path = store.path_of(w)
            status = "present" if path.is_file() else "missing"
            size = f"{w.size / 2**20:.1f} MiB" if w.size else "?"
            print(f"{w.name:<24}{w.filename:<36}{size:>10}  {'pinned' if w.sha256 else 'recorded':<9} {status}")
        print(f"\n{store.GPEN_LICENSE}.\n{store.RETINAFACE_LICENSE}.")
        return 0
    names = args.names or (["GPEN-BFR-512", "retinaface_resnet50"] if args.action == "download"
                           else list(store.CATALOG) if args.action == "verify" else [])
    if not names:
        log.error("name a model: %s", ", ".join(store.CATALOG))
        return EXIT_USAGE
    try:
        files = [store.lookup(n) for n in names]
    except store.WeightsError as exc:
        log.error("%s", exc)
        return EXIT_USAGE
    failed = 0
    for w in files:
        try:
            if args.action == "path":
                print(store.path_of(w))
            elif args.action == "download":
                print(store.download(w, progress=sys.stderr.isatty()))
            elif not store.path_of(w).is_file() and not args.names:
                print(f"{w.name}: missing")
            else:
                path, status = store.verify(w)
                print(f"{w.name}: {'ok (SHA-256 matches the published digest)' if status == 'verified' else 'ok (matches the digest recorded at download; none is published)'} {path}")
        except store.WeightsError as exc:
            log.error("%s", exc)
            failed += 1
    if args.action == "download" and not failed:
        print(f"{store.GPEN_LICENSE}.", file=sys.stderr)
    return EXIT_FAILED if failed else 0


# ---------------------------------------------------------------------- worker


def _worker(args) -> int:
    import torch
    import zmq

    from workers.restorers import ModelUnavailable, build_restorer, resolve_device, resolve_dtype
    from workers.temporal import TemporalBlender
    from workers.worker import Worker

    settings = load_settings(WorkerSettings, config_file=args.config, overrides={
        "endpoint": args.endpoint, "device": args.device, "dtype": args.dtype, "batch": args.batch})
    if not settings.endpoint:
        log.error("worker needs --endpoint (or GPEN_STREAM_WORKER_ENDPOINT)")
        return EXIT_USAGE
    if settings.threads:
        torch.set_num_threads(settings.threads)
    if args.weights is not None and len(args.model) != 1:
        log.error("--weights applies to one --model")
        return EXIT_USAGE
    try:
        device = resolve_device(settings.device)
        dtype = resolve_dtype(settings.dtype, device)
        restorers = {name: build_restorer(name, device=device, dtype=dtype,
                                          weights=args.weights or settings.models.get(name)) for name in args.model}
    except ModelUnavailable as exc:
        log.error("%s", exc)
        return EXIT_FAILED
    worker = Worker(restorers, batch=settings.batch, batch_wait_ms=settings.batch_wait_ms, credits=settings.credits,
                    device=str(device), blender=TemporalBlender(settings.blend_max, settings.blend_sigma))
    try:
        worker.bind(settings.endpoint)
    except zmq.ZMQError as exc:
        log.error("cannot listen on %s: %s", settings.endpoint, exc)
        return EXIT_FAILED
    signal.signal(signal.SIGTERM, lambda *_: worker.stop_event.set())
    signal.signal(signal.SIGINT, lambda *_: worker.stop_event.set())
    if args.parent_pid:
        def watch_parent() -> None:
            while not worker.stop_event.wait(1.0):
                if os.getppid() != args.parent_pid:
                    worker.stop_event.set()

        threading.Thread(target=watch_parent, daemon=True).start()
    worker.serve()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
