"""The decoder's side of the worker protocol: credits, track affinity, failover.

One thread owns the ZeroMQ sockets (they are not thread-safe). Crops go out in frame order;
a worker never holds more crops than it granted credits for, so memory stays bounded
however long the file is. A track sticks to one worker while that worker lives, so its
temporal state sees the track's crops in order; if the worker dies or goes silent, its
unfinished crops are re-sent elsewhere with ``reset`` (the state restarts there) and the job
goes on. A worker that forgot this decoder (it restarted at the same address, or heard nothing
for a while) says so at the next crop or ping: every crop it had not answered is re-sent and
the worker greeted again. A worker that stops says it is leaving: it gets no new crops and
returns those it holds. Only when no worker is left does the job fail.

What a crop that fails or comes back too late does is the job's ``JobPolicy``: a file job
waits for every face and fails on an error (a restoration with holes is not a restoration);
a live job gives each frame a deadline and passes a face through unrestored rather than
hold the picture back. Workers can join during a job: the dispatcher asks its worker
directory (the engine's list, or the Redis registry) once a second and greets newcomers.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Literal, Protocol

import numpy as np
import zmq

from configs.errors import TransientError
from workers import metrics, wire

log = logging.getLogger(__name__)


class DispatchError(TransientError):
    """Crops cannot be restored: no usable worker, or a worker reported a failure (worth
    another attempt: workers come back, memory frees up)."""


@dataclass(frozen=True)
class JobPolicy:
    """What a job does with a crop that fails or is late, and with a source that goes quiet."""

    on_crop_error: Literal["fail", "passthrough"] = "fail"
    deadline_s: float | None = None  # None: crops carry no deadline; else from the frame's arrival
    on_late: Literal["wait", "passthrough"] = "wait"
    hold_s: float | None = None  # repeat the last frame when no new one came for this long (live outputs)


FILE_POLICY = JobPolicy()


def live_policy(latency_s: float, hold_s: float) -> JobPolicy:
    return JobPolicy(on_crop_error="passthrough", deadline_s=latency_s, on_late="passthrough", hold_s=hold_s)


@dataclass(frozen=True)
class WorkerEndpoint:
    """A worker as a directory lists it."""

    endpoint: str
    start_timeout_s: float  # how long it may take to answer hello (embedded workers load a model first)
    is_alive: Callable[[], bool] | None = None  # known only for workers this process started
    describe: Callable[[], str] | None = None  # why it died, for messages


class WorkerDirectory(Protocol):
    def endpoints(self) -> list[WorkerEndpoint]:
        """The workers to use now (a worker missing from a later answer is gone)."""

    def for_model(self, model: str) -> "WorkerDirectory":
        """The directory narrowed to workers that serve ``model``."""


@dataclass
class CropTask:
    frame: int
    face: int
    track: int
    affine: np.ndarray  # 2x3, frame -> crop
    crop: np.ndarray  # S x S x 3 uint8 RGB
    pts: int | None = None
    reset: bool = False
    mask: np.ndarray | None = None  # face-parsing paste mask (S x S float32), if --mask parse


@dataclass
class FrameTask:
    """A decoded frame on its way to the encoder, with the faces to restore in it."""

    index: int
    item: object  # source.DecodedFrame
    crops: list[CropTask] = field(default_factory=list)
    restored: dict[int, np.ndarray] = field(default_factory=dict)  # face -> restored crop
    passed: set[int] = field(default_factory=set)  # faces that go out as they came in (late or failed)
    ended_tracks: list[int] = field(default_factory=list)
    deadline: float | None = None  # time.monotonic() after which missing faces pass through

    @property
    def done(self) -> bool:
        return len(self.restored) + len(self.passed) >= len(self.crops)


_NO_WORKER = object()


@dataclass(frozen=True)
class _TrackEnd:
    """Queued after a track's last crop: tell its worker to forget the track's state."""

    track: int


LEAVING_SILENCE_S = 10 * wire.HEARTBEAT_S  # a leaving worker heard from for this long has exited


class WorkerLink:
    """One worker as seen from here: its socket, credits and unfinished crops."""

    def __init__(self, context: zmq.Context, endpoint: str, *, is_alive: Callable[[], bool] | None = None,
                 describe: Callable[[], str] | None = None, start_timeout_s: float | None = None,
                 socket_options: Callable[[zmq.Socket], None] | None = None):
        self.endpoint = endpoint
        self.socket = context.socket(zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.setsockopt(zmq.MAXMSGSIZE, wire.MAX_MESSAGE_BYTES)
        if socket_options is not None:  # e.g. CURVE keys
            socket_options(self.socket)
        self.socket.connect(endpoint)
        self.credits = 0
        self.ready = False
        self.dead = False
        self.leaving = False  # it is stopping: no new crops; those it holds come back
        self.worker_id = ""  # from its first credit: another id at the same address is a restart
        self.name = endpoint
        self.greeted = 0.0  # when hello was (last) sent
        self.start_timeout_s = start_timeout_s
        self.last_heard = time.monotonic()
        self.last_ping = 0.0
        self.outstanding: dict[tuple[int, int], CropTask] = {}
        self.tracks: set[int] = set()
        self.reason = ""  # why it was declared dead
        self._is_alive = is_alive or (lambda: True)
        self.describe = describe or (lambda: "")

    @classmethod
    def to(cls, context: zmq.Context, worker: WorkerEndpoint, **kw) -> "WorkerLink":
        return cls(context, worker.endpoint, is_alive=worker.is_alive, describe=worker.describe,
                   start_timeout_s=worker.start_timeout_s, **kw)

    def alive(self) -> bool:
        return not self.dead and self._is_alive()

    def send(self, header, pixels: np.ndarray | None = None) -> None:
        self.socket.send_multipart(wire.encode(header, pixels), copy=False)

    def tell(self, header) -> bool:
        """Send a message that may be dropped (ping, end of track, bye) without waiting: to a
        worker that went away they queue up to the socket's limit, then a send would block
        the dispatch thread. Whether it was queued."""
        try:
            self.socket.send_multipart(wire.encode(header), flags=zmq.NOBLOCK)
            return True
        except zmq.Again:
            return False

    def close(self, linger_ms: int = 0) -> None:
        self.socket.close(linger=linger_ms)


class Dispatcher:
    def __init__(self, links: list[WorkerLink], *, job: str, model: str, size: int, temporal: str,
                 timeout_s: float, policy: JobPolicy = FILE_POLICY, directory: WorkerDirectory | None = None,
                 context: zmq.Context | None = None, link_options: dict | None = None):
        self.links = list(links)
        self.job, self.model, self.size, self.temporal = job, model, size, temporal
        self.timeout_s = timeout_s
        self.policy = policy
        self.directory, self.context, self.link_options = directory, context, link_options or {}
        self._queue: deque[CropTask] = deque()
        self._redo: list[CropTask] = []  # sent, not answered, to go out again before the queue
        self._frames: dict[int, FrameTask] = {}
        self._affinity: dict[int, WorkerLink] = {}
        self._poller = zmq.Poller()
        self._last_refresh = 0.0
        self.passed_faces = 0  # faces that went out unrestored (live: late or failed)
        for link in self.links:
            self._poller.register(link.socket, zmq.POLLIN)

    # ------------------------------------------------------------------ setup and teardown

    def wait_ready(self, timeout_s: float, should_stop: Callable[[], None] | None = None) -> None:
        """Greet every worker and wait for its first credit (models loaded). A worker must
        answer within its own start timeout (short for a remote worker that should already be
        running, long for one this process just started), and within ``timeout_s`` in any
        case. ``should_stop`` is called while waiting and may raise to abandon the wait."""
        self._refresh(force=True)
        for link in self.links:
            self._greet(link)
        while not all(link.ready or link.dead for link in self.links):
            if should_stop is not None:
                should_stop()
            self._poll(100)
            now = time.monotonic()
            for link in self.links:
                if link.ready or link.dead:
                    continue
                if not link.alive():
                    self._declare_dead(link, f"exited while starting{link.describe()}")
                limit = min(timeout_s, link.start_timeout_s or timeout_s)
                if now - link.greeted > limit:
                    self._declare_dead(link, f"did not answer within {limit:.0f} s; is a gpen-stream worker "
                                             "running there?")
        live = [link for link in self.links if link.ready and not link.dead]
        if not live:
            reasons = "; ".join(f"{link.name}: {link.reason or 'no answer'}" for link in self.links) or "none listed"
            raise DispatchError(f"no worker could serve {self.model}: {reasons}")

    def close(self) -> None:
        for link in self.links:
            said_bye = False
            if link.alive():
                try:
                    said_bye = link.tell(wire.Bye(job=self.job))
                except zmq.ZMQError:
                    pass
            link.close(linger_ms=500 if said_bye else 0)  # let the bye reach a remote worker

    # ------------------------------------------------------------------ work

    @property
    def frames_in_flight(self) -> int:
        return len(self._frames)

    def submit(self, task: FrameTask) -> None:
        if task.deadline is None and self.policy.deadline_s is not None:
            task.deadline = time.monotonic() + self.policy.deadline_s
        self._frames[task.index] = task
        self._queue.extend(task.crops)
        # Queued, not sent: the end of a track must not overtake its last crops.
        self._queue.extend(_TrackEnd(track) for track in task.ended_tracks)

    def pump(self, timeout_ms: int) -> list[FrameTask]:
        """Send what credits allow, receive results, check health. Returns frames whose
        crops are all back, or passed through (in no particular order)."""
        self._refresh()
        self._send_queued()
        self._poll(timeout_ms if self._queue or self._redo or any(link.outstanding for link in self.links) else 0)
        self._check_health()
        self._expire_late()
        self._send_queued()
        self._ping()
        finished = [t for t in self._frames.values() if t.done]
        for t in finished:
            del self._frames[t.index]
        return finished

    def _requeue(self, tasks) -> None:
        """Crops sent and not answered go out again before anything queued: they are older than
        every queued crop of their tracks. The first of a track wherever it goes starts the
        track's state afresh there (its track is new to that link), the next ones continue it."""
        self._redo.extend(tasks)

    def _send_queued(self) -> None:
        if self._redo:  # in frame order, however they came back
            self._queue.extendleft(sorted(self._redo, key=lambda t: (t.frame, t.face), reverse=True))
            self._redo.clear()
        blocked: set[int] = set()  # a track's crops must not overtake each other
        kept: deque = deque()
        while self._queue:
            task = self._queue.popleft()
            if isinstance(task, _TrackEnd):
                if task.track in blocked:
                    kept.append(task)
                else:
                    self._end_track(task.track)
                continue
            frame = self._frames.get(task.frame)
            if frame is None or task.face in frame.passed:
                continue  # its frame has gone out already
            if task.track in blocked:
                kept.append(task)
                continue
            link = self._link_for(task.track)
            if link is _NO_WORKER:
                self._pass(frame, task.face, "no worker")
                continue
            if link is None or link.credits <= 0:
                blocked.add(task.track)
                kept.append(task)
                continue
            reset = task.reset or task.track not in link.tracks
            link.tracks.add(task.track)
            time_left_s = None if frame.deadline is None else frame.deadline - time.monotonic()
            header = wire.Crop(job=self.job, frame=task.frame, pts=task.pts, track=task.track, face=task.face,
                               model=self.model, size=self.size, shape=(self.size, self.size, 3),
                               affine=tuple(map(tuple, task.affine.tolist())), temporal=self.temporal, reset=reset,
                               time_left_s=time_left_s)
            link.send(header, task.crop)
            link.credits -= 1
            link.outstanding[(task.frame, task.face)] = task
        self._queue = kept

    def _end_track(self, track: int) -> None:
        link = self._affinity.pop(track, None)
        if link is not None and link.alive():
            link.tracks.discard(track)
            link.tell(wire.EndTrack(job=self.job, track=track))  # if dropped, the worker's LRU forgets it

    def _link_for(self, track: int):
        """The track's worker; a new track goes to the worker with most room. None while the
        only workers left are (re)starting; _NO_WORKER when none is left and the policy passes
        faces through."""
        link = self._affinity.get(track)
        if link is not None and link.alive() and link.ready and not link.leaving:
            return link
        live = [lk for lk in self.links if lk.ready and lk.alive() and not lk.leaving]
        if not live:
            if any(lk.alive() and lk.greeted and not lk.leaving for lk in self.links):
                return None  # greeted, not answered yet: wait for it
            if self.policy.on_crop_error == "passthrough":
                return _NO_WORKER
            raise DispatchError("no worker left to restore faces")
        link = max(live, key=lambda lk: (lk.credits - len(lk.tracks) * 0.01, -len(lk.outstanding)))
        self._affinity[track] = link
        return link

    def _pass(self, frame: FrameTask, face: int, why: str) -> None:
        """Send this face out as it came in (live jobs: late, failed, or no worker)."""
        if face not in frame.passed and face not in frame.restored:
            frame.passed.add(face)
            self.passed_faces += 1
            metrics.FACES_PASSED.labels(reason=why).inc()

    def _expire_late(self) -> None:
        if self.policy.on_late != "passthrough":
            return
        now = time.monotonic()
        for frame in self._frames.values():
            if frame.deadline is not None and now >= frame.deadline and not frame.done:
                for c in frame.crops:
                    self._pass(frame, c.face, "late")

    def _ping(self) -> None:
        """Tell workers this decoder is still here (they forget decoders that go silent)."""
        now = time.monotonic()
        for link in self.links:
            if link.ready and not link.dead and now - link.last_ping >= wire.HEARTBEAT_S:
                link.last_ping = now
                link.tell(wire.Ping(job=self.job))

    def _greet(self, link: WorkerLink) -> None:
        link.greeted = time.monotonic()
        link.send(wire.Hello(job=self.job))

    def _refresh(self, force: bool = False) -> None:
        """Pick up workers that joined the directory, drop the ones that left it."""
        now = time.monotonic()
        if self.directory is None or (not force and now - self._last_refresh < wire.HEARTBEAT_S):
            return
        self._last_refresh = now
        listed = {w.endpoint: w for w in self.directory.endpoints()}
        for link in self.links:
            if link.endpoint in listed or link.dead:
                continue
            self._receive(link)  # a leaving worker says so before it leaves the directory
            if not (link.leaving and link.outstanding):  # (it returns the crops it holds)
                self._declare_dead(link, "left the worker directory")
        known = {link.endpoint for link in self.links if not link.dead}
        for endpoint, worker in listed.items():
            if endpoint not in known:
                link = WorkerLink.to(self.context, worker, **self.link_options)
                self.links.append(link)
                self._poller.register(link.socket, zmq.POLLIN)
                if not force:
                    self._greet(link)
        for link in [lk for lk in self.links if lk.dead]:  # forget the dead, once their crops went elsewhere
            self._poller.unregister(link.socket)
            link.close()
            self.links.remove(link)

    def _poll(self, timeout_ms: int) -> None:
        events = dict(self._poller.poll(timeout_ms))
        for link in self.links:
            if link.socket in events:
                self._receive(link)

    def _receive(self, link: WorkerLink) -> None:
        while True:
            try:
                frames = link.socket.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            try:
                header, pixels = wire.decode(frames)
            except wire.WireError as exc:
                metrics.WIRE_INVALID.labels(side="decoder").inc()
                log.warning("dropped an invalid message from %s: %s", link.name, exc)
                continue
            link.last_heard = time.monotonic()
            self._handle(link, header, pixels)

    def _handle(self, link: WorkerLink, header, pixels) -> None:
        if isinstance(header, wire.Credit):
            if not link.ready:  # the answer to our hello: a new session, the whole window
                if self.model not in header.models:
                    self._declare_dead(link, f"serves {', '.join(header.models)}, not {self.model}")
                    return
                link.ready, link.name, link.worker_id = True, f"{header.worker}@{link.endpoint}", header.worker
                link.credits = header.credits
            elif header.worker != link.worker_id:  # another process at the same address
                self._lost_session(link, f"restarted as {header.worker}")
            else:
                link.credits += header.credits
        elif isinstance(header, wire.Forgot):
            if link.ready:  # (not ready: an answer to something sent before our hello; ignore it)
                self._lost_session(link, "it forgot this decoder (restarted, or heard nothing from us)")
        elif isinstance(header, wire.Leaving):
            if not link.leaving:
                log.info("worker %s is stopping; %d crops to come back from it", link.name, len(link.outstanding))
                link.leaving = True
                link.tell(wire.Leaving(worker=header.worker))  # heard: nothing more comes from us
                for track in [t for t, lk in self._affinity.items() if lk is link]:
                    del self._affinity[track]  # their next crops go elsewhere, starting afresh there
                link.tracks.clear()
        elif isinstance(header, (wire.Result, wire.Error)):
            if header.job != self.job:
                log.warning("ignored a reply for job %s from %s", header.job, link.name)
                return
            task = link.outstanding.pop((header.frame, header.face), None)
            if task is None:
                return  # a late reply for a crop already re-sent elsewhere
            frame = self._frames.get(header.frame)
            if isinstance(header, wire.Error):
                self._failed(link, task, frame, header)
                return
            link.credits += 1
            if header.size != self.size:
                raise DispatchError(f"worker {link.name} returned {header.size}px crops, expected {self.size}px")
            if frame is not None and header.face not in frame.passed:
                frame.restored[header.face] = pixels  # a view that keeps the received message alive
        else:
            log.warning("unexpected %s message from %s", header.kind, link.name)

    def _lost_session(self, link: WorkerLink, why: str) -> None:
        """The worker holds nothing of ours any more: re-send what it had not answered (to it
        once it answers hello again, or elsewhere) and greet it."""
        log.warning("worker %s lost this job's crops (%s); re-sending %d and greeting it again", link.name, why,
                    len(link.outstanding))
        self._requeue(link.outstanding.values())
        link.outstanding.clear()
        link.ready, link.credits, link.leaving = False, 0, False
        link.tracks.clear()
        for track in [t for t, lk in self._affinity.items() if lk is link]:
            del self._affinity[track]
        self._greet(link)

    def _failed(self, link: WorkerLink, task: CropTask, frame: FrameTask | None, error: wire.Error) -> None:
        link.credits += 1
        if frame is None:
            return
        if self.policy.on_crop_error == "fail":
            raise DispatchError(f"worker {link.name} could not restore frame {error.frame}: {error.reason}")
        self._pass(frame, error.face, "error")

    def _check_health(self) -> None:
        now = time.monotonic()
        for link in self.links:
            if link.dead:
                continue
            if not link.ready:
                if not link.alive():
                    self._declare_dead(link, f"exited{link.describe()}")
                elif link.greeted and link.start_timeout_s and now - link.greeted > link.start_timeout_s:
                    self._declare_dead(link, f"did not answer hello within {link.start_timeout_s:.0f} s")
                continue
            if not link.alive():
                # A worker that drains on SIGTERM sends its last results just before exiting.
                if link.socket.poll(200, zmq.POLLIN):
                    self._receive(link)
                self._declare_dead(link, f"exited{link.describe()}")
            elif link.leaving and now - link.last_heard > LEAVING_SILENCE_S:
                self._declare_dead(link, "stopped")
            elif now - link.last_heard > self.timeout_s:  # workers send a credit every second
                self._declare_dead(link, f"silent for {now - link.last_heard:.0f} s with {len(link.outstanding)} "
                                         "crops outstanding")

    def _declare_dead(self, link: WorkerLink, reason: str) -> None:
        if link.dead:
            return
        link.dead = True
        log.warning("worker %s is gone (%s); %d crops go elsewhere", link.name, reason, len(link.outstanding))
        if link.ready:
            metrics.WORKER_FAILOVERS.inc()
        self._requeue(link.outstanding.values())
        link.outstanding.clear()
        for track in link.tracks:
            self._affinity.pop(track, None)
        link.tracks.clear()
        link.credits = 0
        link.reason = reason
