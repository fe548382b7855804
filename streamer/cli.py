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

log = logging.getLogger("gpen-stream")

EXIT_FAILED, EXIT_USAGE, EXIT_CANCELLED = 1, 2, 130

DESCRIPTION = """\
Restore faces in videos with GPEN.

  gpen-stream restore in.mp4 -o out.mp4          restore a file (weights fetched on first use)
  gpen-stream models list                        which model files are cached, and their licences
  gpen-stream worker --endpoint tcp://0.0.0.0:5555 --model GPEN-BFR-512
                                                 serve a model to decoders on other machines
  gpen-stream serve --input-root /media/in --output-root /media/out
                                                 run jobs that other services put in Redis
  gpen-stream submit in.mp4 -o out.mp4 --wait    queue a job for a serve daemon and follow it
  gpen-stream status|cancel|watch ID, jobs       look after queued jobs

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


class Interrupt:
    """SIGINT/SIGTERM handler installed before anything slow: it only records the signal and
    sets an event. Commands watch the event (restore cancels, worker drains); nothing is
    ever raised into a thread that may be inside FFmpeg or a lock."""

    def __init__(self):
        self.event = threading.Event()
        self.signum: int | None = None

    def __call__(self, signum, _frame) -> None:
        self.signum = self.signum or signum
        self.event.set()

    def install(self) -> "Interrupt":
        signal.signal(signal.SIGTERM, self)
        signal.signal(signal.SIGINT, self)
        return self

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else "a signal"


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE", help="YAML settings file (sections: restore, engine, worker)")
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
    r.add_argument("--redis", metavar="URL", help="use the workers registered in this Redis (gpen-stream worker "
                                                 "--redis URL) instead of starting one; workers may join and leave")
    r.add_argument("--prefix", help="with --redis: the workers' key prefix (default gpen)")
    r.add_argument("--keys", type=Path, metavar="DIR", help="CURVE keys for workers that require them "
                                                            "(gpen-stream keys DIR)")
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

    lv = sub.add_parser("live", help="restore faces in a live stream, with bounded latency", description=LIVE_HELP,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    lv.add_argument("input", help="rtsp:// rtmp:// srt:// udp:// URL, or a file with --realtime")
    lv.add_argument("-o", "--output", action="append", required=True, metavar="OUTPUT",
                    help="rtsp:// rtmp:// srt:// udp:// (publish), a .m3u8 playlist (HLS on disk), or a recording "
                         "(.mkv, .ts); repeatable")
    lv.add_argument("--realtime", action="store_true", help="INPUT is a local file: play it at its own frame rate")
    lv.add_argument("--loop", action="store_true", help="with --realtime: start the file again at its end")
    lv.add_argument("--rtsp-transport", choices=["tcp", "udp"], help="for rtsp:// inputs (default tcp)")
    lv.add_argument("--latency-ms", type=float, help="deadline after a frame's arrival; faces not restored by then "
                                                     "go out unrestored (default 500)")
    lv.add_argument("--segment-time", type=float, metavar="S", help="split recordings into files of S seconds")
    lv.add_argument("--http-port", type=int, metavar="PORT", help="serve /metrics and /healthz on this port")
    lv.add_argument("--http-host", default="127.0.0.1", metavar="ADDR",
                    help="address for --http-port (default 127.0.0.1; 0.0.0.0: every interface, e.g. in a container)")
    for flag, kw in (("--model", {}), ("--weights", {"type": Path}), ("--detector", {}),
                     ("--detector-weights", {"type": Path}), ("--detect-every", {"type": int, "metavar": "K"}),
                     ("--device", {}), ("--dtype", {}), ("--batch", {"type": int}), ("--workers", {"type": int}),
                     ("--connect", {"action": "append", "metavar": "ENDPOINT"}), ("--redis", {"metavar": "URL"}),
                     ("--prefix", {}),
                     ("--keys", {"type": Path, "metavar": "DIR"}), ("--temporal", {}),
                     ("--strength", {"type": float}), ("--codec", {}), ("--crf", {"type": float}), ("--preset", {})):
        lv.add_argument(flag, help="as for restore", **kw)
    lv.add_argument("-q", "--quiet", action="store_true", help="no status line")
    lv.add_argument("--json-progress", action="store_true", help="one JSON line per second: fps in/out, hit rate, "
                                                                 "latency p50/p99, drops, reconnects")
    _add_common(lv)

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
    w.add_argument("--redis", metavar="URL", help="register in this Redis (decoders find us; memory leases)")
    w.add_argument("--prefix", help="Redis key prefix (default gpen)")
    w.add_argument("--advertise", metavar="ENDPOINT", help="what decoders connect to (default: --endpoint with "
                                                           "0.0.0.0 replaced by this host's name)")
    w.add_argument("--memory-budget-mib", type=int, metavar="MIB",
                   help="the device's memory budget shared by its workers (default: the GPU's total memory)")
    w.add_argument("--keys", type=Path, metavar="DIR", help="CURVE keys (gpen-stream keys DIR): serve only decoders "
                                                            "that hold the decoder key")
    w.add_argument("--insecure", action="store_true", help="allow a non-loopback tcp:// endpoint without keys")
    _add_common(w)

    k = sub.add_parser("keys", help="write CURVE key pairs for workers and decoders")
    k.add_argument("folder", type=Path, help="folder to write worker.key[_secret] and decoder.key[_secret] into")
    _add_common(k)

    sv = sub.add_parser("serve", help="run jobs from Redis (gpen:jobs) until SIGTERM", description=SERVE_HELP,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_redis(sv)
    sv.add_argument("--concurrency", type=int, metavar="N", help="jobs run at once (default 2)")
    sv.add_argument("--input-root", action="append", type=Path, metavar="DIR",
                    help="a folder jobs may read from (repeatable; serve.input_roots)")
    sv.add_argument("--output-root", action="append", type=Path, metavar="DIR",
                    help="a folder jobs may write to (repeatable; serve.output_roots)")
    sv.add_argument("--http-port", type=int, metavar="PORT", help="/metrics and /healthz (default 9310; 0: off)")
    sv.add_argument("--http-host", metavar="ADDR", help="address for --http-port (default 127.0.0.1)")
    sv.add_argument("--connect", action="append", metavar="ENDPOINT", help="use running workers instead of our own")
    sv.add_argument("--farm", action="store_true", help="use the workers registered in Redis (gpen-stream worker "
                                                        "--redis) instead of our own (engine.redis)")
    sv.add_argument("--keys", type=Path, metavar="DIR", help="CURVE keys for workers that require them")
    sv.add_argument("--workers", type=int, metavar="N", help="our own inference workers (default: one per GPU, or 1)")
    sv.add_argument("--device", help="auto|cpu|cuda|cuda:N for our own workers")
    sv.add_argument("--model", help="the model jobs get when they name none (default GPEN-BFR-512)")
    _add_common(sv)

    sb = sub.add_parser("submit", help="queue a job for gpen-stream serve")
    sb.add_argument("input", type=Path, help="video file (a path the daemon can read, under its input roots)")
    sb.add_argument("-o", "--output", type=Path, required=True, help="file to write (under the daemon's output roots)")
    sb.add_argument("--id", help="your idempotency key (default: a new random id); an id that exists runs nothing")
    sb.add_argument("--model", help="GPEN-BFR-256|512|1024|2048 or identity (default: the daemon's)")
    sb.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                    help="a per-job setting of the restore: section, e.g. crf=16 temporal=off faces=/media/in/f.jsonl")
    sb.add_argument("--wait", action="store_true", help="follow the job with a progress bar until it ends")
    _add_redis(sb)
    _add_common(sb)
    for name, text in (("status", "print a job's state (JSON)"), ("cancel", "cancel a job (queued or running)"),
                       ("watch", "follow a job with a progress bar until it ends")):
        c = sub.add_parser(name, help=text)
        c.add_argument("id", help="the job id")
        _add_redis(c)
        _add_common(c)
    j = sub.add_parser("jobs", help="recent jobs and their states")
    j.add_argument("--limit", type=int, default=20)
    _add_redis(j)
    _add_common(j)
    return parser


LIVE_HELP = """Restore faces in a live stream and publish the result, until SIGINT/SIGTERM.

Each frame gets live.latency_ms after its arrival: a frame whose faces are not back by then
goes out with them unrestored (counted as a miss), so the picture is never held back. When
the workers or outputs fall behind, the newest frames win; drops are counted. An input that
stops sending is reopened with backoff while the outputs repeat the last picture.

  gpen-stream live rtsp://camera/stream -o rtsp://media-server:8554/enhanced
  gpen-stream live rtsp://camera/stream -o /srv/hls/cam.m3u8 -o /srv/rec/cam.mkv --segment-time 600
  gpen-stream live demo.mp4 --realtime --loop -o udp://127.0.0.1:5004
"""


SERVE_HELP = """Run restoration jobs that other services queue in Redis, until SIGTERM (then running jobs get
serve.drain_s to finish; the rest stay queued for another daemon). Workers and models load
once and serve every job. Jobs may only read under --input-root and write under
--output-root. /metrics and /healthz on --http-port. Protocol: README.md, "Jobs over Redis".
"""


def _add_redis(p: argparse.ArgumentParser) -> None:
    p.add_argument("--redis", metavar="URL", help="redis://[user:password@]host:port/db, rediss:// for TLS "
                                                 "(default serve.redis: redis://127.0.0.1:6379/0)")
    p.add_argument("--prefix", help="Redis key prefix (default gpen)")


def main(argv: list[str] | None = None) -> int:
    interrupt = Interrupt().install()  # first: a signal during start-up must not kill us with 143
    args = build_parser().parse_args(argv)
    from configs import SettingsError
    from streamer import logs

    logs.setup(args.log_level, args.log_format)
    try:
        commands = {"restore": _restore, "live": _live, "models": _models, "worker": _worker, "keys": _keys,
                    "serve": _serve,
                    "submit": _submit,
                    "status": _status, "cancel": _cancel, "watch": _watch, "jobs": _jobs}
        return commands[args.command](args, interrupt)
    except SettingsError as exc:
        log.error("%s", exc)
        return EXIT_USAGE
    except Exception as exc:  # a command failed in a way it did not foresee: one line, no traceback
        log.error("failed: %s: %s (run with --log-level debug for details)", type(exc).__name__, exc)
        log.debug("traceback", exc_info=True)
        return EXIT_FAILED


# ---------------------------------------------------------------------- restore


def _restore(args, interrupt: Interrupt) -> int:
    reporter = _ProgressReporter(quiet=args.quiet, json_lines=args.json_progress)
    if interrupt.event.is_set():
        return _cancelled(reporter, interrupt)
    from configs import EngineSettings, JobOptions, SettingsError, WorkerSettings, load_settings
    from configs.errors import Cancelled, GpenStreamError
    from streamer.engine import worker_weights
    from streamer.jobs.restore import restore_file

    options = load_settings(JobOptions, config_file=args.config, overrides={
        "model": args.model, "detector": args.detector, "detect_every": args.detect_every, "temporal": args.temporal,
        "strength": args.strength, "color_match": args.color_match, "mask": args.mask, "codec": args.codec,
        "crf": args.crf, "preset": args.preset, "corrupt_frames": args.corrupt_frames})
    engine = load_settings(EngineSettings, config_file=args.config, overrides={
        "workers": args.workers, "isolate_workers": args.isolate_workers, "connect": args.connect,
        "detector_weights": args.detector_weights, "parser_weights": args.parser_weights, "redis": args.redis,
        "prefix": args.prefix, "keys_dir": args.keys})
    worker = worker_weights(load_settings(WorkerSettings, config_file=args.config, overrides={
        "device": args.device, "dtype": args.dtype, "batch": args.batch}), options.model, args.weights)
    extra_reads = {"--config file": Path(args.config)} if args.config else {}
    try:
        result = restore_file(args.input, args.output, options, worker, engine_settings=engine,
                              faces_file=args.faces, dump_faces=args.dump_faces, progress=reporter,
                              cancel=interrupt.event, extra_reads=extra_reads)
    except Cancelled:
        return _cancelled(reporter, interrupt)
    except (GpenStreamError, SettingsError) as exc:
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
               **result.damage, "elapsed_s": round(result.elapsed_s, 3), "fps": round(result.fps, 3)}
    reporter.emit(summary)
    notes = {"corrupt_frames": "undecodable frames skipped", "concealed_frames": "frames concealed by the decoder",
             "damaged_spots": "damaged spots in the container", "fixed_pts": "timestamps repaired"}
    note = "".join(f", {result.damage[k]} {text}" for k, text in notes.items() if result.damage.get(k))
    log.info("wrote %s: %d frames, %d faces restored in %.1f s (%.2f fps)%s", result.output, result.frames,
             result.faces, result.elapsed_s, result.fps, note)
    return 0


def _live(args, interrupt: Interrupt) -> int:
    if interrupt.event.is_set():
        return 0
    from configs import EngineSettings, JobOptions, LiveSettings, WorkerSettings, load_settings
    from configs.errors import Cancelled, GpenStreamError
    from streamer.engine import Engine, worker_weights
    from streamer.jobs.live import LiveStream, run_live
    from workers import metrics

    options = load_settings(JobOptions, config_file=args.config, overrides={
        "model": args.model, "detector": args.detector, "detect_every": args.detect_every, "temporal": args.temporal,
        "strength": args.strength, "codec": args.codec, "crf": args.crf, "preset": args.preset})
    live = load_settings(LiveSettings, config_file=args.config, overrides={
        "latency_ms": args.latency_ms, "rtsp_transport": args.rtsp_transport, "segment_time_s": args.segment_time})
    engine_settings = load_settings(EngineSettings, config_file=args.config, overrides={
        "workers": args.workers, "connect": args.connect, "redis": args.redis, "prefix": args.prefix,
        "keys_dir": args.keys,
        "detector_weights": args.detector_weights})
    worker = worker_weights(load_settings(WorkerSettings, config_file=args.config, overrides={
        "device": args.device, "dtype": args.dtype, "batch": args.batch}), options.model, args.weights)
    stream = LiveStream(args.input, tuple(args.output), realtime=args.realtime, loop=args.loop)
    status = _LiveStatus(quiet=args.quiet, json_lines=args.json_progress)
    http = None
    try:
        engine = Engine(engine_settings, worker)
    except GpenStreamError as exc:
        log.error("%s", exc)
        return EXIT_FAILED
    try:
        if args.http_port:
            from streamer.serve.http import start_http

            http = start_http(args.http_host, args.http_port,
                              lambda: {"ok": engine.workers_ok(), "workers": engine.worker_count()})
        engine.check_model(options.model)
        run_live(engine, stream, options, live, cancel=interrupt.event,
                 progress=lambda p: (metrics.publish_live("live", p.live or {}), status(p)))
        log.info("the input ended")
        return 0
    except Cancelled:
        log.info("stopped by %s; outputs closed", interrupt.name)
        return 0
    except GpenStreamError as exc:
        log.error("%s", exc)
        return EXIT_FAILED
    finally:
        status.close()
        if http is not None:
            http.shutdown()
        engine.close()


class _LiveStatus:
    """Once a second: a status line on stderr, or a JSON line on stdout (--json-progress)."""

    def __init__(self, *, quiet: bool, json_lines: bool):
        self.quiet, self.json_lines = quiet, json_lines
        self.last = 0.0
        self.shown = False

    def __call__(self, p) -> None:
        now = time.monotonic()
        if p.live is None or now - self.last < 1.0:
            return
        self.last = now
        s = p.live
        if self.json_lines:
            print(json.dumps({"event": "live", "elapsed_s": round(p.elapsed_s, 1), **s}), flush=True)
        elif not self.quiet:
            hit = "-" if s["hit_rate"] is None else f"{s['hit_rate']:.0%}"
            print(f"\r{s['fps_in']:5.1f} fps in, {s['fps_out']:5.1f} out, restored in time {hit}, latency p50 "
                  f"{s['latency_p50_ms']} p99 {s['latency_p99_ms']} ms, dropped {s.get('dropped', 0)}, "
                  f"reconnects {s.get('reconnects', 0)}   ", end="", file=sys.stderr, flush=True)
            self.shown = True

    def close(self) -> None:
        if self.shown:
            print(file=sys.stderr)


def _cancelled(reporter: "_ProgressReporter", interrupt: Interrupt) -> int:
    reporter.close()
    reporter.emit({"event": "cancelled"})
    log.error("interrupted by %s; no output written", interrupt.name)
    return EXIT_CANCELLED


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


def _models(args, interrupt: Interrupt) -> int:
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
                said = ("ok (SHA-256 matches the published digest)" if status == "verified"
                        else "ok (matches the digest recorded at download; none is published)")
                print(f"{w.name}: {said} {path}")
        except store.WeightsError as exc:
            log.error("%s", exc)
            failed += 1
    if args.action == "download" and not failed:
        print(f"{store.GPEN_LICENSE}.", file=sys.stderr)
    return EXIT_FAILED if failed else 0


# ---------------------------------------------------------------------- worker


def _worker(args, interrupt: Interrupt) -> int:
    import socket
    import uuid

    import zmq

    from configs import WorkerSettings, load_settings
    from configs.errors import GpenStreamError
    from configs.keys import Keys
    from workers import security
    from workers.build import build_worker

    settings = load_settings(WorkerSettings, config_file=args.config, overrides={
        "endpoint": args.endpoint, "device": args.device, "dtype": args.dtype, "batch": args.batch,
        "redis": args.redis, "prefix": args.prefix, "advertise": args.advertise, "keys_dir": args.keys,
        "insecure": args.insecure or None,
        "memory_budget_mib": args.memory_budget_mib})
    if not settings.endpoint:
        log.error("worker needs --endpoint (or GPEN_STREAM_WORKER_ENDPOINT)")
        return EXIT_USAGE
    if not security.is_local(settings.endpoint) and settings.keys_dir is None and not settings.insecure:
        log.error("refusing to serve %s without keys: anyone who can reach it could use this device. Write keys "
                  "with 'gpen-stream keys DIR' and pass --keys DIR (decoders set engine.keys_dir to the same "
                  "folder), or pass --insecure on a network you trust", settings.endpoint)
        return EXIT_USAGE
    if args.weights is not None:
        if len(args.model) != 1:
            log.error("--weights applies to one --model")
            return EXIT_USAGE
        settings = settings.model_copy(update={"models": {**settings.models, args.model[0]: args.weights}})
    worker_id = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:4]}"
    redis = budget = registration = server_keys = None
    try:
        if settings.redis:
            from streamer.serve.connection import connect
            from workers.budget import GpuBudget, device_total_mib
            from workers.restorers import resolve_device

            redis = connect(settings.redis)
            device = resolve_device(settings.device)
            index = device.index if device.type == "cuda" and device.index is not None else (
                0 if device.type == "cuda" else device.type)
            budget = GpuBudget(redis, Keys(settings.prefix).gpu(socket.gethostname(), index), worker_id,
                               device_total_mib(device, settings.memory_budget_mib), ttl_s=settings.registry_ttl_s)
        worker = build_worker(args.model, settings, worker_id=worker_id, budget=budget)
        if settings.keys_dir is not None:
            server_keys = security.ServerKeys(settings.keys_dir, worker.context)
            server_keys.apply(worker.socket)
        try:
            bound = worker.bind(settings.endpoint)
        except zmq.ZMQError as exc:
            log.error("cannot listen on %s: %s", settings.endpoint, exc)
            return EXIT_FAILED
        if redis is not None:
            from workers.registry import Registration

            registration = Registration(redis, Keys(settings.prefix), worker,
                                        endpoint=settings.advertise or security.advertised(bound),
                                        ttl_s=settings.registry_ttl_s, budget=budget).start()
            worker.on_stopping.append(registration.withdraw)  # draining: decoders pick other workers

        def watch() -> None:  # a signal (or the decoder that started us exiting) stops the worker: it drains
            while not worker.stop_event.is_set():
                if interrupt.event.wait(1.0) or (args.parent_pid and os.getppid() != args.parent_pid):
                    worker.stop_event.set()

        threading.Thread(target=watch, daemon=True).start()
        worker.serve()
    except GpenStreamError as exc:
        log.error("%s", exc)
        return EXIT_FAILED
    except InterruptedError:
        return EXIT_CANCELLED
    finally:
        if registration is not None:
            registration.stop()
        elif budget is not None:
            budget.release()
        if server_keys is not None:
            server_keys.stop()
    return 0


def _keys(args, interrupt: Interrupt) -> int:
    from workers.security import write_keys

    for path in write_keys(args.folder):
        print(path)
    print("give workers --keys DIR (worker.keys_dir) and decoders engine.keys_dir: the same folder; workers need "
          "worker.key_secret and decoder.key, decoders decoder.key_secret and worker.key", file=sys.stderr)
    return 0


# ---------------------------------------------------------------------- serve and its clients


def _serve(args, interrupt: Interrupt) -> int:
    if interrupt.event.is_set():
        return EXIT_CANCELLED
    from configs import EngineSettings, JobOptions, LiveSettings, ServeSettings, WorkerSettings, load_settings
    from configs.errors import GpenStreamError
    from streamer.engine import Engine
    from streamer.serve.connection import connect, redact
    from streamer.serve.daemon import Daemon
    from streamer.serve.http import start_http

    serve = load_settings(ServeSettings, config_file=args.config, overrides={
        "redis": args.redis, "prefix": args.prefix, "concurrency": args.concurrency, "input_roots": args.input_root,
        "output_roots": args.output_root, "http_port": args.http_port, "http_host": args.http_host})
    defaults = load_settings(JobOptions, config_file=args.config, overrides={"model": args.model})
    engine_settings = load_settings(EngineSettings, config_file=args.config, overrides={
        "connect": args.connect, "workers": args.workers, "keys_dir": args.keys,
        "redis": serve.redis if args.farm else None})
    worker = load_settings(WorkerSettings, config_file=args.config, overrides={"device": args.device})
    if not serve.input_roots or not serve.output_roots:
        log.error("serve needs the folders jobs may read and write: --input-root DIR --output-root DIR "
                  "(serve.input_roots, serve.output_roots)")
        return EXIT_USAGE
    try:
        client = connect(serve.redis)
    except GpenStreamError as exc:
        log.error("%s", exc)
        return EXIT_FAILED
    http = None
    try:
        engine = Engine(engine_settings, worker, prefix=serve.prefix)
    except GpenStreamError as exc:
        log.error("%s", exc)
        return EXIT_FAILED
    try:
        if engine.directory is None:
            log.info("loading workers for %s", defaults.model)
            engine.check_model(defaults.model)
            engine.workers_for(defaults.model)  # the common model is ready before the first job arrives
        daemon = Daemon(serve, engine, defaults, client=client, live=load_settings(LiveSettings, config_file=args.config))
        if serve.http_port:
            http = start_http(serve.http_host, serve.http_port, daemon.health)
            log.info("metrics and health on http://%s:%d/metrics, /healthz", serve.http_host, serve.http_port)
        daemon.serve(interrupt.event)
    except GpenStreamError as exc:
        log.error("%s", exc)
        return EXIT_FAILED
    finally:
        if http is not None:
            http.shutdown()
        engine.close()
    log.info("stopped (%s)", redact(serve.redis))
    return 0


def _client(args):
    from configs import ServeSettings, load_settings
    from streamer.serve.client import Client

    serve = load_settings(ServeSettings, config_file=args.config, overrides={"redis": args.redis,
                                                                            "prefix": args.prefix})
    return Client(serve.redis, serve.prefix)


def _option_value(text: str):
    try:
        return json.loads(text)  # 16, 0.5, true, "x"
    except json.JSONDecodeError:
        return text  # temporal=off


def _submit(args, interrupt: Interrupt) -> int:
    options = {}
    for item in args.option:
        key, sep, value = item.partition("=")
        if not sep or not key:
            log.error("--option takes KEY=VALUE, got %r", item)
            return EXIT_USAGE
        options[key] = _option_value(value)
    if "faces" in options:
        options["faces"] = str(Path(options["faces"]).absolute())
    client = _client(args)
    job_id = client.submit(args.input, args.output, job_id=args.id, model=args.model, options=options)
    print(job_id, flush=True)
    return _follow(client, job_id, interrupt) if args.wait else 0


def _status(args, interrupt: Interrupt) -> int:
    status = _client(args).status(args.id)
    if not status:
        log.error("no job %s (not seen by a daemon yet, or expired)", args.id)
        return EXIT_FAILED
    print(json.dumps(status, indent=2, sort_keys=True))
    return 0


def _cancel(args, interrupt: Interrupt) -> int:
    _client(args).cancel(args.id)
    log.info("cancel requested for %s", args.id)
    return 0


def _watch(args, interrupt: Interrupt) -> int:
    return _follow(_client(args), args.id, interrupt)


def _follow(client, job_id: str, interrupt: Interrupt) -> int:
    """A progress bar fed by the job's events; the exit code says how it ended."""
    from tqdm import tqdm

    bar = tqdm(total=1.0, unit="job", bar_format="{l_bar}{bar}| {postfix}", file=sys.stderr, disable=None)
    final = {}
    try:
        for event in client.watch(job_id):
            if interrupt.event.is_set():
                return EXIT_CANCELLED  # stops watching; the job goes on
            final = event
            if event.get("progress"):
                bar.n = float(event["progress"])
            bar.set_postfix_str(f"{event.get('state', '')} {event.get('fps', '')} fps, eta {event.get('eta_s', '?')} s")
    finally:
        bar.close()
    state = final.get("state")
    print(json.dumps(client.status(job_id) or final, sort_keys=True))
    return {"done": 0, "cancelled": EXIT_CANCELLED}.get(state, EXIT_FAILED)


def _jobs(args, interrupt: Interrupt) -> int:
    jobs = _client(args).jobs(args.limit)
    print(f"{'id':<34} {'state':<10} {'progress':>8}  {'created':<24} error")
    for job in jobs:
        progress = job.get("progress") or ""
        shown = f"{float(progress) * 100:.0f}%" if progress else ""
        print(f"{job['id'][:34]:<34} {job.get('state', '?'):<10} {shown:>8}  {job.get('created', ''):<24} "
              f"{job.get('error', '')[:60]}")
    return 0


def run() -> None:
    """The command line's entry point (``gpen-stream``, ``python -m streamer``): main(), then
    exit with its status. Once a command has returned, its outcome is settled (the output
    committed or not), so SIGINT and SIGTERM are ignored from then on: Python puts back the
    default handlers while it exits, and exiting takes a while (unloading torch's CUDA build
    alone ~1.4 s), in which a signal would otherwise kill a finished run ("killed by SIGINT",
    its complete output left behind)."""
    try:
        code = main()
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise SystemExit(code)


if __name__ == "__main__":
    run()
