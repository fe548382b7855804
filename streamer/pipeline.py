"""One job's data path, between a source and a sink, on an engine's shared parts:

    source -> analyzer -> dispatcher <-> workers -> compositor -> sink
    (demux,   (faces,     (ZeroMQ:          (GPEN,   (reorder done,   (encode, copy
     decode)   tracks,     credits,          temporal  paste faces)     other streams)
               crops)      affinity)         state)

Three threads per job: decode+analyse, dispatch, compose+write. Each arrow is a bounded
queue and at most ``max_frames_in_flight`` frames are between the source and the sink, so
memory does not grow with the input's length. Any stage's failure stops every stage; the
sink is aborted (nothing is left behind) and the error is raised from ``run_job``.

Teardown never closes a container another thread may still use: the calling thread waits
for every stage thread to have returned (events, not ``Thread.join``, which a signal can
interrupt into a wrong answer) before the source and sink are closed. Cancelling is a
``threading.Event``: signal handlers set it, they never raise into this code.
"""

from __future__ import annotations

import contextvars
import logging
import queue
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

from configs import JobOptions
from configs.errors import Cancelled
from streamer.analyze import Analyzer
from streamer.composite import Compositor, prepare_face
from streamer.dispatch import FILE_POLICY, Dispatcher, FrameTask, JobPolicy
from streamer.io.probe import packet_offset_s
from streamer.io.yuv import YUVLayout, copy_frame
from workers import metrics
from workers.restorers import IDENTITY

log = logging.getLogger(__name__)

_END = object()
PASSTHROUGH_LEAD_S = 0.5  # copy other streams' packets up to this far ahead of the video
# Other streams' packets demuxed ahead of the writer. Beyond this many the decoder waits, and the
# writer, once it has written every frame decoded so far, copies them at once: audio that
# outlasts the video (or is muxed far ahead of it) is not held in memory whole.
PACKETS_AHEAD_MAX = 1024
STUCK_THREAD_S = 60.0  # a stage that has not returned this long after a stop is reported, and its containers leaked


@dataclass
class Progress:
    frames_done: int
    frames_total: int  # 0 if unknown
    elapsed_s: float
    live: dict | None = None  # live jobs: LiveStats.snapshot()

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
class JobResult:
    output: object  # what the sink committed (a Path for files)
    frames: int
    faces: int
    elapsed_s: float
    damage: dict[str, int] = field(default_factory=dict)  # the source's counts: corrupt, concealed, ...
    passed_faces: int = 0  # faces sent out unrestored (live: late or failed)
    timings: dict[str, float] = field(default_factory=dict)  # busy seconds per stage

    @property
    def fps(self) -> float:
        return self.frames / self.elapsed_s if self.elapsed_s else 0.0

    @property
    def corrupt_frames(self) -> int:
        return self.damage.get("corrupt_frames", 0)

    @property
    def fixed_pts(self) -> int:
        return self.damage.get("fixed_pts", 0)


LATENCY_SAMPLES = 2000  # latency percentiles are over this many most recent frames


class LiveStats:
    """What a live job reports: frames in and out, how many frames got their faces restored in
    time (the hit rate), latency from arrival to encode, repeats while the input was away."""

    def __init__(self):
        self.started = time.monotonic()
        self.frames_out = self.repeats = 0
        self.frames_with_faces = self.frames_hit = 0
        self.faces_restored = self.faces_passed = 0
        self.latencies: deque[float] = deque(maxlen=LATENCY_SAMPLES)
        self._lock = threading.Lock()

    def frame(self, task, latency_s: float | None) -> None:
        with self._lock:
            self.frames_out += 1
            if task.crops:
                self.frames_with_faces += 1
                self.frames_hit += not task.passed
                self.faces_restored += len(task.restored)
                self.faces_passed += len(task.passed)
            if latency_s is not None:
                self.latencies.append(latency_s)

    def snapshot(self, source_summary: dict) -> dict:
        with self._lock:
            lat = sorted(self.latencies)
            elapsed = max(time.monotonic() - self.started, 1e-9)
            pick = (lambda q: round(1000 * lat[min(len(lat) - 1, int(q * len(lat)))], 1)) if lat else (lambda q: None)
            return {**source_summary, "fps_in": round(source_summary.get("frames_in", 0) / elapsed, 2),
                    "fps_out": round(self.frames_out / elapsed, 2), "frames_out": self.frames_out,
                    "repeats": self.repeats, "hit_rate": round(self.frames_hit / self.frames_with_faces, 4)
                    if self.frames_with_faces else None, "faces_restored": self.faces_restored,
                    "faces_passed": self.faces_passed, "latency_p50_ms": pick(0.5), "latency_p99_ms": pick(0.99)}


def effective_temporal(options: JobOptions) -> str:
    """``auto``: blending for real models; for ``identity`` (a diagnostic of alignment and
    paste-back) landmark smoothing only, so the output shows exactly what was cut out."""
    if options.temporal != "auto":
        return options.temporal
    return "landmarks" if options.model == IDENTITY else "full"


class _Run:
    """Shared stop flag, first error and stage threads of one job."""

    def __init__(self):
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self._lock = threading.Lock()
        self.timings: dict[str, float] = {}
        self.exited: list[threading.Event] = []
        self.on_stop: Callable[[], None] | None = None  # wakes a source that blocks waiting for input

    def fail(self, exc: BaseException) -> None:
        with self._lock:
            if self.error is None:
                self.error = exc
        self.halt()

    def halt(self) -> None:
        self.stop.set()
        if self.on_stop is not None:
            self.on_stop()

    def spawn(self, name: str, target: Callable[[], None]) -> threading.Event:
        exited = threading.Event()

        def guarded():
            try:
                target()
            except _Stopped:
                pass
            except BaseException as exc:  # surfaced by run_job
                self.fail(exc)
            finally:
                exited.set()

        self.exited.append(exited)
        context = contextvars.copy_context()  # the job id for log lines, among others
        threading.Thread(target=context.run, args=(guarded,), name=name, daemon=True).start()
        return exited

    def all_exited(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        return all(e.wait(max(0.0, deadline - time.monotonic())) for e in self.exited)

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


def run_job(engine, source, sink, options: JobOptions, *, policy: JobPolicy = FILE_POLICY, faces_by_frame=None,
            dump=None, progress: Callable[[Progress], None] | None = None, cancel: threading.Event | None = None,
            job_id: str | None = None, max_in_flight: int | None = None) -> JobResult:
    """Run one job on ``engine`` (see ``Engine.run``). Raises ``Cancelled`` when ``cancel``
    is set before the output was committed; the sink is then aborted."""
    started = time.monotonic()
    cancel = cancel or threading.Event()

    def check_cancel() -> None:
        if cancel.is_set():
            raise Cancelled("cancelled")

    run = _Run()
    run.on_stop = getattr(source, "interrupt", None)  # a live source waits for its camera; files never wait
    dispatcher = None
    try:
        check_cancel()
        size = engine.crop_size(options.model)
        detector = None if faces_by_frame is not None else engine.detector(options.detector)
        parser = engine.parser() if options.mask == "parse" else None
        check_cancel()
        dispatcher = Dispatcher([], directory=engine.workers_for(options.model), context=engine.context,
                                job=job_id or uuid.uuid4().hex[:12], model=options.model, size=size,
                                temporal=effective_temporal(options), timeout_s=engine.settings.worker_timeout_s,
                                policy=policy, link_options=engine.link_options)
        dispatcher.wait_ready(engine.settings.worker_start_timeout_s, should_stop=check_cancel)
        check_cancel()
        layout = YUVLayout(sink.open(source.info, source.copied), source.info.output_colorspace,
                           source.info.color_range)
        analyzer = Analyzer(source.info, options, size, layout, faces_by_frame=faces_by_frame, detector=detector,
                            parser=parser, dump_to=dump)
        compositor = Compositor(layout, mask_inset=options.mask_inset, mask_feather=options.mask_feather)
        counters = _Counters()
        live = LiveStats() if policy.deadline_s is not None else None
        stages = _Stages(run, source, analyzer, dispatcher, sink, compositor, options,
                         max_in_flight or engine.settings.max_frames_in_flight, counters, policy, live)
        for name, fn in stages.all():
            run.spawn(name, fn)
        total = source.info.expected_frames
        while not run.all_exited(0.1):  # waits on events: a signal handler may run, nothing breaks
            if cancel.is_set():
                run.fail(Cancelled("cancelled"))
            if progress is not None:
                try:
                    snapshot = live.snapshot(source.summary()) if live is not None else None
                    progress(Progress(counters.frames, total, time.monotonic() - started, snapshot))
                except Exception as exc:  # a broken progress consumer stops the job cleanly
                    run.fail(exc)
        if run.error is not None:
            raise run.error
        check_cancel()  # the last chance to change our mind: after this line the output exists
        output = sink.commit()
        if dump is not None:
            dump.commit()
        damage = source.summary()
        if damage.get("fixed_pts"):
            log.warning("%d frames had missing or out-of-order timestamps; they were given timestamps between "
                        "their neighbours'", damage["fixed_pts"])
        if progress is not None:
            progress(Progress(counters.frames, counters.frames, time.monotonic() - started))
        timings = dict(run.timings, detect=analyzer.detect_s)
        return JobResult(output, counters.frames, counters.faces, time.monotonic() - started, damage,
                         dispatcher.passed_faces, timings)
    except BaseException as exc:
        run.fail(exc)
        if not _wait_for_stages(run):
            log.error("a pipeline stage did not stop within %.0f s; its files are left open", STUCK_THREAD_S)
            raise
        sink.abort()  # after a commit this removes nothing
        if dump is not None:
            dump.abort()
        raise
    finally:
        run.halt()
        if _wait_for_stages(run):
            source.close()
        if dispatcher is not None:
            dispatcher.close()


def _wait_for_stages(run: _Run) -> bool:
    """True once every stage thread has returned (an interrupt while waiting is held back
    until then: tearing down under a running stage is what crashed before)."""
    deadline = time.monotonic() + STUCK_THREAD_S
    pending: BaseException | None = None
    while True:
        try:
            done = run.all_exited(max(0.0, deadline - time.monotonic()))
            break
        except BaseException as exc:  # e.g. KeyboardInterrupt with Python's default handler
            pending = pending or exc
    if pending is not None:
        raise pending
    return done


@dataclass
class _Counters:
    frames: int = 0
    faces: int = 0


class _Stages:
    """A job's threads, each a loop over its input queue."""

    def __init__(self, run: _Run, source, analyzer: Analyzer, dispatcher: Dispatcher, sink,
                 compositor: Compositor, options: JobOptions, max_in_flight: int, counters: _Counters,
                 policy: JobPolicy = FILE_POLICY, live: LiveStats | None = None):
        self.run, self.source, self.analyzer, self.dispatcher = run, source, analyzer, dispatcher
        self.sink, self.compositor, self.options, self.counters = sink, compositor, options, counters
        self.max_in_flight, self.policy, self.live = max_in_flight, policy, live
        self.analyzed: queue.Queue = queue.Queue(maxsize=8)
        self.ordered: queue.Queue = queue.Queue(maxsize=max_in_flight)
        self.packets: deque = deque()  # other streams' packets, in demux order; None ends them
        self.frames_decoded = 0  # handed on by the decoder (the writer has caught up when it wrote as many)
        self.packets_dropped = 0  # live only: held while the video was away, too many to keep
        self.input_done = False
        self.last: FrameTask | None = None  # the last frame written (live: repeated while the input is away)

    def all(self):
        return [("decoder", self.decode), ("dispatcher", self.dispatch), ("writer", self.write)]

    def decode(self) -> None:
        """Decode and analyse in one thread: one hand-off less per frame (analysis is light,
        except detection, which decoding could not overlap usefully on a busy CPU anyway)."""
        run = self.run
        frames = self.source.frames(self._hold_packet)
        while True:
            started = time.perf_counter()
            item = next(frames, _END)
            run.timed("decode", started)
            if run.stop.is_set():
                return
            if item is _END:
                run.put(self.analyzed, _END)
                return
            started = time.perf_counter()
            task = self.analyzer(item)
            run.timed("analyze", started)
            if self.policy.deadline_s is not None and item.arrived:  # late is measured from arrival
                task.deadline = item.arrived + self.policy.deadline_s
            run.put(self.analyzed, task)
            self.frames_decoded += 1

    def _hold_packet(self, packet) -> None:
        """The decoder's hand-off of another stream's packet. A file job's decoder waits while
        PACKETS_AHEAD_MAX are held (the writer copies them once it has caught up, see
        _next_task). A live job's never waits (that would stall the input): while its video is
        away the writer drops the oldest (_repeat_last)."""
        if packet is not None and self.policy.hold_s is None:
            while len(self.packets) >= PACKETS_AHEAD_MAX:
                if self.run.stop.wait(0.005):
                    raise _Stopped
        self.packets.append(packet)

    def dispatch(self) -> None:
        """Feed the dispatcher, pump it, and hand finished frames on in order. It never blocks
        on the writer (it keeps pumping, so workers keep hearing from us); the reorder buffer
        is bounded because no new frame is taken while it is full."""
        run, dispatcher = self.run, self.dispatcher
        reorder: dict[int, FrameTask] = {}
        next_index, upstream_done = 0, False
        while not run.stop.is_set():
            moved = False
            while not upstream_done and dispatcher.frames_in_flight + len(reorder) < self.max_in_flight:
                try:
                    task = self.analyzed.get(timeout=0.02 if dispatcher.frames_in_flight == 0 else 0)
                except queue.Empty:
                    break
                moved = True
                if task is _END:
                    upstream_done = True
                else:
                    dispatcher.submit(task)
            for task in dispatcher.pump(timeout_ms=10):  # returns at once when no crop is out
                reorder[task.index] = task
                moved = True
            while next_index in reorder and not self.ordered.full():
                self.ordered.put(reorder.pop(next_index))
                next_index += 1
                moved = True
            if upstream_done and dispatcher.frames_in_flight == 0 and not reorder:
                run.put(self.ordered, _END)
                return
            if not moved and dispatcher.frames_in_flight == 0:  # pump() did not wait: waiting for the writer
                run.stop.wait(0.002)
        raise _Stopped

    def write(self) -> None:
        run, sink = self.run, self.sink
        while (task := self._next_task()) is not _END:
            if task is None:  # the live input is away: the outputs go on showing the last picture
                self._repeat_last()
                continue
            started = time.perf_counter()
            frame = self._compose(task)
            run.timed("compose", started)
            started = time.perf_counter()
            if self.last is not None and task.item.pts <= self.last.item.pts:  # after repeats of the last picture
                # a millisecond later at least: containers that count milliseconds (Matroska, FLV) keep them apart
                task.item.pts = self.last.item.pts + max(1, round(0.001 / float(self.source.info.time_base)))
                task.item.time_s = float(task.item.pts * self.source.info.time_base)
            sink.write(frame, task.item.pts)
            self._copy_packets(until_s=task.item.time_s - self.source.info.start_s + PASSTHROUGH_LEAD_S)
            run.timed("encode", started)
            self.counters.frames += 1
            self.counters.faces += len(task.restored)
            self.last = task
            if self.live is not None:
                self.live.frame(task, time.monotonic() - task.item.arrived if task.item.arrived else None)
            metrics.FRAMES_WRITTEN.inc()
        self._copy_packets(until_s=None)

    def _next_task(self):
        """The next frame in order; None when the policy holds the picture (no frame for hold_s)."""
        if self.policy.hold_s is None:
            while not self.run.stop.is_set():
                try:
                    return self.ordered.get(timeout=0.02)
                except queue.Empty:
                    if len(self.packets) >= PACKETS_AHEAD_MAX and self.counters.frames == self.frames_decoded:
                        self._copy_packets(until_s=None)  # no frame to wait for: the decoder waits for these
            raise _Stopped
        hold_s = self.policy.hold_s
        deadline = time.monotonic() + hold_s
        while not self.run.stop.is_set():
            try:
                return self.ordered.get(timeout=min(0.1, max(0.0, deadline - time.monotonic())))
            except queue.Empty:
                now = time.monotonic()
                if now >= deadline and self.last is not None:
                    # only while the input is away: a frame still on its way through the job
                    # (detection, the model) must not make the outputs stutter
                    arrived = getattr(self.source, "last_arrival", 0.0)
                    if now - arrived >= hold_s:
                        return None
                    deadline = arrived + hold_s
        raise _Stopped

    def _repeat_last(self) -> None:
        """Encode the last picture again, stamped with the clock (pts keep increasing)."""
        task = self.last
        step = max(1, round(self.policy.hold_s / float(self.source.info.time_base)))
        task.item.pts += step
        task.item.time_s = float(task.item.pts * self.source.info.time_base)
        # a copy: the outputs stamp the frame they encode, and the last one may still be queued in one
        task.item.frame = copy_frame(task.item.frame)
        self.sink.write(task.item.frame, task.item.pts)
        if self.live is not None:
            self.live.repeats += 1
        if len(self.packets) > PACKETS_AHEAD_MAX:  # the video is away, the other streams are not
            if not self.packets_dropped:
                log.warning("the video stalled while other streams went on: dropping their oldest packets")
            while len(self.packets) > PACKETS_AHEAD_MAX and self.packets[0] is not None:
                self.packets.popleft()
                self.packets_dropped += 1

    def _compose(self, task: FrameTask):
        frame, compositor = task.item.frame, self.compositor  # the analyzer put it in the output's layout
        if task.restored:
            frame.make_writable()
            o = self.options
            faces = []
            for c in task.crops:
                restored = task.restored.get(c.face)
                if restored is None:  # passed through: the frame already shows it as it came in
                    continue
                mask = compositor.mask(c.crop.shape[0]) if c.mask is None else c.mask
                face = prepare_face(c.crop, restored, strength=o.strength, color_match=o.color_match, mask=mask)
                faces.append((face, c.affine, mask))
            metrics.FACES_PASTED.inc(compositor.paste(frame, faces))
        return frame

    def _copy_packets(self, until_s: float | None) -> None:
        """Copy the other streams' packets up to ``until_s`` seconds into the video (all of them
        once the input is exhausted or ``until_s`` is None)."""
        while self.packets:
            packet = self.packets[0]
            if packet is None:  # the source reached the end: nothing left to wait for
                self.packets.popleft()
                self.input_done = True
                continue
            offset = packet_offset_s(packet)
            if until_s is not None and not self.input_done and offset is not None and offset > until_s:
                return
            self.sink.copy(self.packets.popleft())
