"""The restore pipeline: one video file in, the same file with faces restored out.

    reader -> analyzer -> dispatcher <-> workers -> writer
    (demux,   (faces,     (ZeroMQ:          (GPEN,   (reorder done, composite,
     decode)   tracks,     credits,          temporal  encode, copy other
               crops)      affinity)         state)    streams)

Each arrow is a bounded queue and at most ``max_frames_in_flight`` frames are between the
reader and the writer, so memory does not grow with the file's length. Any stage's failure
stops every stage, deletes the partial output and is raised from ``restore_file``.
"""

from __future__ import annotations

import logging
import queue
import signal
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import zmq

from configs import RestoreSettings, WorkerSettings
from configs.atomic import AtomicText
from streamer.analyze import Analyzer
from streamer.composite import Compositor, prepare_face
from streamer.dispatch import Dispatcher, FrameTask, WorkerLink
from streamer.faces.faces_file import read_faces_file
from streamer.io.probe import packet_offset_s, probe
from streamer.io.sink import Writer, check_output
from streamer.io.source import Reader
from streamer.io.yuv import YUVLayout
from workers import metrics
from workers.pool import start_local_workers
from workers.restorers import IDENTITY, crop_size

log = logging.getLogger(__name__)

_END = object()
PASSTHROUGH_LEAD_S = 0.5  # copy other streams' packets up to this far ahead of the video
WORKER_START_TIMEOUT_S = 300.0


class RestoreCancelled(RuntimeError):
    """The job was cancelled; no output was written."""


@dataclass
class Progress:
    frames_done: int
    frames_total: int  # 0 if unknown
    elapsed_s: float

    @property
    def fps(self) -> float:
        return self.frames_done / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def fraction(self) -> float | None:
        return min(1.0, self.frames_done / self.frames_total) if self.frames_total else None

    @property
    def eta_s(self) -> float | None:
        if not self.frames_total or not self.frames_done:
            return None
        return max(0.0, (self.frames_total - self.frames_done) / self.fps)


@dataclass
class RestoreResult:
    output: Path
    frames: int
    faces: int
    corrupt_frames: int
    elapsed_s: float
    fixed_pts: int
    timings: dict[str, float] = field(default_factory=dict)  # busy seconds per stage

    @property
    def fps(self) -> float:
        return self.frames / self.elapsed_s if self.elapsed_s else 0.0


class _Run:
    """Shared stop flag and first error of a pipeline run."""

    def __init__(self):
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self._lock = threading.Lock()
        self.timings: dict[str, float] = {}

    def fail(self, exc: BaseException) -> None:
        with self._lock:
            if self.error is None:
                self.error = exc
        self.stop.set()

    def spawn(self, name: str, target: Callable[[], None]) -> threading.Thread:
        def guarded():
            try:
                target()
            except _Stopped:
                pass
            except BaseException as exc:  # surfaced by restore_file
                self.fail(exc)

        thread = threading.Thread(target=guarded, name=name, daemon=True)
        thread.start()
        return thread

    def put(self, q: queue.Queue, item) -> None:
        while not self.stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return
            except queue.Full:
                continue
        raise _Stopped

    def get(self, q: queue.Queue):
        while not self.stop.is_set():
            try:
                return q.get(timeout=0.1)
            except queue.Empty:
                continue
        raise _Stopped

    def timed(self, stage: str, started: float) -> None:
        self.timings[stage] = self.timings.get(stage, 0.0) + time.perf_counter() - started


class _Stopped(Exception):
    pass


def _load_detector(settings: RestoreSettings, worker: WorkerSettings):
    from streamer.faces.detect import FaceDetector, load_retinaface
    from workers.restorers import resolve_device

    net = load_retinaface(settings.detector, resolve_device(worker.device), weights=settings.detector_weights)
    return FaceDetector(net, threshold=settings.detect_threshold, max_side=settings.detect_max_side)


def _load_parser(settings: RestoreSettings, worker: WorkerSettings):
    if settings.mask != "parse":
        return None
    from streamer.faces.parse import FaceParser
    from workers.restorers import resolve_device

    return FaceParser(resolve_device(worker.device), weights=settings.parser_weights)


def restore_file(input_path: str | Path, output_path: str | Path, settings: RestoreSettings,
                 worker_settings: WorkerSettings, *, faces_file: str | Path | None = None,
                 dump_faces: str | Path | None = None, progress: Callable[[Progress], None] | None = None,
                 cancel: threading.Event | None = None) -> RestoreResult:
    """Restore the faces in ``input_path`` and write ``output_path`` (atomically).

    ``cancel`` (set from any thread) stops the job with RestoreCancelled; nothing is written.
    """
    started = time.monotonic()

    def check_cancel() -> None:
        if cancel is not None and cancel.is_set():
            raise RestoreCancelled("cancelled")

    info = probe(input_path)
    output_path = Path(output_path)
    check_output(output_path, Path(input_path))  # before any slow work
    if dump_faces is not None:
        check_output(Path(dump_faces))
    weights = settings.weights
    if weights is None and settings.model != IDENTITY and not settings.connect:
        from gpen.weights import ensure

        weights = ensure(settings.model)  # fetched and verified before any work starts
    size = crop_size(settings.model, settings.weights)
    faces_by_frame = read_faces_file(faces_file) if faces_file is not None else None
    check_cancel()
    detector = None if faces_by_frame is not None else _load_detector(settings, worker_settings)
    parser = _load_parser(settings, worker_settings)
    check_cancel()

    run = _Run()
    context = zmq.Context.instance()
    pool = reader = writer = dump = dispatcher = None
    threads: list[threading.Thread] = []
    try:
        if settings.connect:  # workers elsewhere (gpen-stream worker --endpoint ...)
            links = [WorkerLink(context, endpoint) for endpoint in settings.connect]
        else:
            pool = start_local_workers(settings.model, weights, worker_settings, count=settings.workers,
                                       isolate=settings.isolate_workers, context=context)
            links = [WorkerLink(context, w.endpoint, is_alive=w.is_alive, describe=w.describe) for w in pool.workers]
        dispatcher = Dispatcher(links, job=uuid.uuid4().hex[:12], model=settings.model, size=size,
                                temporal=settings.temporal, timeout_s=settings.worker_timeout_s)
        dispatcher.wait_ready(WORKER_START_TIMEOUT_S, should_stop=check_cancel)
        reader = Reader(info, strict=settings.corrupt_frames == "fail")
        writer = Writer(output_path, info, reader.copied, codec=settings.codec, crf=settings.crf,
                        preset=settings.preset)
        dump = AtomicText(Path(dump_faces)) if dump_faces else None
        layout = YUVLayout(writer.pix_fmt, info.output_colorspace, info.color_range)
        analyzer = Analyzer(info, settings, size, layout, faces_by_frame=faces_by_frame, detector=detector,
                            parser=parser, dump_to=dump)
        compositor = Compositor(layout, mask_inset=settings.mask_inset, mask_feather=settings.mask_feather)
        counters = _Counters()
        stages = _Stages(run, reader, analyzer, dispatcher, writer, compositor, settings, counters)
        threads = [run.spawn(name, fn) for name, fn in stages.all()]
        total = info.expected_frames
        while any(t.is_alive() for t in threads):
            threads[-1].join(timeout=0.1)  # the writer finishes last (or everything stops)
            if cancel is not None and cancel.is_set():
                run.fail(RestoreCancelled("cancelled"))
            if progress is not None:
                try:
                    progress(Progress(counters.frames, total, time.monotonic() - started))
                except Exception as exc:  # a broken progress consumer stops the job cleanly
                    run.fail(exc)
        if run.error is not None:
            raise run.error
        with _signals_blocked():  # an interrupt now must not leave a renamed file reported as failed
            writer.commit()
            if dump is not None:
                dump.commit()
        if writer.fixed_pts:
            log.warning("%d frames had repeated or decreasing timestamps; each was moved one tick later",
                        writer.fixed_pts)
        if progress is not None:
            progress(Progress(counters.frames, counters.frames, time.monotonic() - started))
        timings = dict(run.timings, detect=analyzer.detect_s)
        return RestoreResult(output_path, counters.frames, counters.faces, reader.corrupt,
                             time.monotonic() - started, writer.fixed_pts, timings)
    except BaseException as exc:
        run.fail(exc)
        _join(threads)  # no thread may still be using what is torn down below
        if writer is not None:
            writer.abort()
        if dump is not None:
            dump.abort()
        raise
    finally:
        run.stop.set()
        if reader is not None:
            reader.close()
        if dispatcher is not None:
            dispatcher.close()
        if pool is not None:
            pool.stop()


def _join(threads: list[threading.Thread], timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))


class _signals_blocked:
    """Hold SIGINT/SIGTERM back (main thread, POSIX) for a short critical section."""

    SIGNALS = {signal.SIGINT, signal.SIGTERM}

    def __enter__(self):
        self.active = threading.current_thread() is threading.main_thread() and hasattr(signal, "pthread_sigmask")
        if self.active:
            signal.pthread_sigmask(signal.SIG_BLOCK, self.SIGNALS)

    def __exit__(self, *exc):
        if self.active:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, self.SIGNALS)


@dataclass
class _Counters:
    frames: int = 0
    faces: int = 0


class _Stages:
    """The pipeline's threads, each a loop over its input queue."""

    def __init__(self, run: _Run, reader: Reader, analyzer: Analyzer, dispatcher: Dispatcher, writer: Writer,
                 compositor: Compositor, settings: RestoreSettings, counters: _Counters):
        self.run, self.reader, self.analyzer, self.dispatcher = run, reader, analyzer, dispatcher
        self.writer, self.compositor, self.settings, self.counters = writer, compositor, settings, counters
        self.analyzed: queue.Queue = queue.Queue(maxsize=8)
        self.ordered: queue.Queue = queue.Queue(maxsize=settings.max_frames_in_flight)
        self.packets: deque = deque()  # other streams' packets, in demux order; None ends them
        self.input_done = False

    def all(self):
        return [("decoder", self.decode), ("dispatcher", self.dispatch), ("writer", self.write)]

    def decode(self) -> None:
        """Decode and analyse in one thread: one hand-off less per frame (analysis is light,
        except detection, which decoding could not overlap usefully on a busy CPU anyway)."""
        run = self.run
        frames = self.reader.frames(self.packets.append)
        while True:
            started = time.perf_counter()
            item = next(frames, _END)
            run.timed("decode", started)
            if item is _END:
                run.put(self.analyzed, _END)
                return
            started = time.perf_counter()
            task = self.analyzer(item)
            run.timed("analyze", started)
            run.put(self.analyzed, task)

    def dispatch(self) -> None:
        run, dispatcher = self.run, self.dispatcher
        limit = self.settings.max_frames_in_flight
        reorder: dict[int, FrameTask] = {}
        next_index, upstream_done = 0, False
        while not run.stop.is_set():
            while not upstream_done and dispatcher.frames_in_flight + len(reorder) < limit:
                try:
                    task = self.analyzed.get(timeout=0.02 if dispatcher.frames_in_flight == 0 else 0)
                except queue.Empty:
                    break
                if task is _END:
                    upstream_done = True
                else:
                    dispatcher.submit(task)
            for task in dispatcher.pump(timeout_ms=10):
                reorder[task.index] = task
            while next_index in reorder:  # blocks while the writer is behind: memory stays bounded
                run.put(self.ordered, reorder.pop(next_index))
                next_index += 1
            if upstream_done and dispatcher.frames_in_flight == 0 and not reorder:
                run.put(self.ordered, _END)
                return

    def write(self) -> None:
        run, writer = self.run, self.writer
        while (task := run.get(self.ordered)) is not _END:
            started = time.perf_counter()
            frame = self._compose(task)
            run.timed("compose", started)
            started = time.perf_counter()
            writer.write(frame, task.item.pts, task.index)
            self._copy_packets(until_s=task.item.time_s - writer.info.start_s + PASSTHROUGH_LEAD_S)
            run.timed("encode", started)
            self.counters.frames += 1
            self.counters.faces += len(task.crops)
            metrics.FRAMES_WRITTEN.inc()
        self._copy_packets(until_s=None)

    def _compose(self, task: FrameTask):
        frame, compositor = task.item.frame, self.compositor  # the analyzer put it in the output's layout
        if task.crops:
            frame.make_writable()
            s = self.settings
            faces = []
            for c in task.crops:
                mask = compositor.mask(c.crop.shape[0]) if c.mask is None else c.mask
                face = prepare_face(c.crop, task.restored[c.face], strength=s.strength, color_match=s.color_match,
                                    mask=mask)
                faces.append((face, c.affine, mask))
            metrics.FACES_PASTED.inc(compositor.paste(frame, faces))
        return frame

    def _copy_packets(self, until_s: float | None) -> None:
        """Copy the other streams' packets up to ``until_s`` seconds into the video (all of them
        once the input is exhausted or ``until_s`` is None)."""
        while self.packets:
            packet = self.packets[0]
            if packet is None:  # the reader reached the end: nothing left to wait for
                self.packets.popleft()
                self.input_done = True
                continue
            offset = packet_offset_s(packet)
            if until_s is not None and not self.input_done and offset is not None and offset > until_s:
                return
            self.writer.copy(self.packets.popleft())
