"""The decoder's side of the worker protocol: credits, track affinity, failover.

One thread owns the ZeroMQ sockets (they are not thread-safe). Crops go out in frame order;
a worker never holds more crops than it granted credits for, so memory stays bounded
however long the file is. A track sticks to one worker while that worker lives, so its
temporal state sees the track's crops in order; if the worker dies or goes silent, its
unfinished crops are re-sent elsewhere with ``reset`` (the state restarts there) and the job
goes on. Only when no worker is left does the job fail.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import zmq

from workers import metrics, wire

log = logging.getLogger(__name__)


class DispatchError(RuntimeError):
    """Crops cannot be restored: no usable worker, or a worker reported a failure."""


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
    item: object  # media.DecodedFrame
    crops: list[CropTask] = field(default_factory=list)
    restored: dict[int, np.ndarray] = field(default_factory=dict)  # face -> restored crop
    ended_tracks: list[int] = field(default_factory=list)

    @property
    def done(self) -> bool:
        return len(self.restored) == len(self.crops)


@dataclass(frozen=True)
class _TrackEnd:
    """Queued after a track's last crop: tell its worker to forget the track's state."""

    track: int


class WorkerLink:
    """One worker as seen from here: its socket, credits and unfinished crops."""

    def __init__(self, context: zmq.Context, endpoint: str, *, is_alive: Callable[[], bool] | None = None,
                 describe: Callable[[], str] | None = None):
        self.endpoint = endpoint
        self.socket = context.socket(zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.setsockopt(zmq.MAXMSGSIZE, wire.MAX_MESSAGE_BYTES)
        self.socket.connect(endpoint)
        self.credits = 0
        self.ready = False
        self.dead = False
        self.name = endpoint
        self.last_heard = time.monotonic()
        self.outstanding: dict[tuple[int, int], CropTask] = {}
        self.tracks: set[int] = set()
        self.reason = ""  # why it was declared dead
        self._is_alive = is_alive or (lambda: True)
        self.describe = describe or (lambda: "")

    def alive(self) -> bool:
        return not self.dead and self._is_alive()

    def send(self, header, pixels: np.ndarray | None = None) -> None:
        self.socket.send_multipart(wire.encode(header, pixels), copy=False)

    def close(self, linger_ms: int = 0) -> None:
        self.socket.close(linger=linger_ms)


class Dispatcher:
    def __init__(self, links: list[WorkerLink], *, job: str, model: str, size: int, temporal: str,
                 timeout_s: float):
        self.links = links
        self.job, self.model, self.size, self.temporal = job, model, size, temporal
        self.timeout_s = timeout_s
        self._queue: deque[CropTask] = deque()
        self._frames: dict[int, FrameTask] = {}
        self._affinity: dict[int, WorkerLink] = {}
        self._poller = zmq.Poller()
        for link in links:
            self._poller.register(link.socket, zmq.POLLIN)

    # ------------------------------------------------------------------ setup and teardown

    def wait_ready(self, timeout_s: float, should_stop: Callable[[], None] | None = None) -> None:
        """Greet every worker and wait for its first credit (models loaded). ``should_stop``
        is called while waiting and may raise to abandon the wait."""
        for link in self.links:
            link.send(wire.Hello(job=self.job))
        deadline = time.monotonic() + timeout_s
        while not all(link.ready or link.dead for link in self.links):
            if should_stop is not None:
                should_stop()
            self._poll(200)
            for link in self.links:
                if not link.ready and not link.dead and not link.alive():
                    self._declare_dead(link, f"exited while starting{link.describe()}")
            if time.monotonic() > deadline:
                for link in self.links:
                    if not link.ready:
                        self._declare_dead(link, f"did not answer within {timeout_s:.0f} s")
        live = [link for link in self.links if link.ready and not link.dead]
        if not live:
            reasons = "; ".join(f"{link.name}: {link.reason or 'no answer'}" for link in self.links)
            raise DispatchError(f"no worker could serve {self.model}: {reasons}")

    def close(self) -> None:
        for link in self.links:
            said_bye = False
            if link.alive():
                try:
                    link.send(wire.Bye(job=self.job))
                    said_bye = True
                except zmq.ZMQError:
                    pass
            link.close(linger_ms=500 if said_bye else 0)  # let the bye reach a remote worker

    # ------------------------------------------------------------------ work

    @property
    def frames_in_flight(self) -> int:
        return len(self._frames)

    def submit(self, task: FrameTask) -> None:
        self._frames[task.index] = task
        self._queue.extend(task.crops)
        # Queued, not sent: the end of a track must not overtake its last crops.
        self._queue.extend(_TrackEnd(track) for track in task.ended_tracks)

    def pump(self, timeout_ms: int) -> list[FrameTask]:
        """Send what credits allow, receive results, check health. Returns frames whose
        crops are all back (in no particular order)."""
        self._send_queued()
        self._poll(timeout_ms if self._queue or any(link.outstanding for link in self.links) else 0)
        self._check_health()
        self._send_queued()
        finished = [t for t in self._frames.values() if t.done]
        for t in finished:
            del self._frames[t.index]
        return finished

    def _send_queued(self) -> None:
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
            link = None if task.track in blocked else self._link_for(task.track)
            if link is None or link.credits <= 0:
                blocked.add(task.track)
                kept.append(task)
                continue
            reset = task.reset or task.track not in link.tracks
            link.tracks.add(task.track)
            header = wire.Crop(job=self.job, frame=task.frame, pts=task.pts, track=task.track, face=task.face,
                               model=self.model, size=self.size, shape=(self.size, self.size, 3),
                               affine=tuple(map(tuple, task.affine.tolist())), temporal=self.temporal, reset=reset)
            link.send(header, task.crop)
            link.credits -= 1
            link.outstanding[(task.frame, task.face)] = task
        self._queue = kept

    def _end_track(self, track: int) -> None:
        link = self._affinity.pop(track, None)
        if link is not None and link.alive():
            link.tracks.discard(track)
            link.send(wire.EndTrack(job=self.job, track=track))

    def _link_for(self, track: int) -> WorkerLink | None:
        link = self._affinity.get(track)
        if link is not None and link.alive():
            return link
        live = [lk for lk in self.links if lk.ready and lk.alive()]
        if not live:
            raise DispatchError("no worker left to restore faces")
        link = max(live, key=lambda lk: (lk.credits - len(lk.tracks) * 0.01, -len(lk.outstanding)))
        self._affinity[track] = link
        return link

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
            if not link.ready:
                if self.model not in header.models:
                    self._declare_dead(link, f"serves {', '.join(header.models)}, not {self.model}")
                    return
                link.ready, link.name = True, f"{header.worker}@{link.endpoint}"
            link.credits += header.credits
        elif isinstance(header, (wire.Result, wire.Error)):
            if header.job != self.job:
                log.warning("ignored a reply for job %s from %s", header.job, link.name)
                return
            task = link.outstanding.pop((header.frame, header.face), None)
            if task is None:
                return  # a late reply for a crop already re-sent elsewhere
            link.credits += 1
            if isinstance(header, wire.Error):
                raise DispatchError(f"worker {link.name} could not restore frame {header.frame}: {header.reason}")
            if header.size != self.size:
                raise DispatchError(f"worker {link.name} returned {header.size}px crops, expected {self.size}px")
            frame = self._frames.get(header.frame)
            if frame is not None:
                frame.restored[header.face] = pixels  # a view that keeps the received message alive
        else:
            log.warning("unexpected %s message from %s", header.kind, link.name)

    def _check_health(self) -> None:
        now = time.monotonic()
        for link in self.links:
            if link.dead or not link.ready:
                continue
            if not link.alive():
                # A worker that drains on SIGTERM sends its last results just before exiting.
                if link.socket.poll(200, zmq.POLLIN):
                    self._receive(link)
                self._declare_dead(link, f"exited{link.describe()}")
            elif link.outstanding and now - link.last_heard > self.timeout_s:
                self._declare_dead(link, f"silent for {now - link.last_heard:.0f} s with {len(link.outstanding)} "
                                         "crops outstanding")

    def _declare_dead(self, link: WorkerLink, reason: str) -> None:
        if link.dead:
            return
        link.dead = True
        log.warning("worker %s is gone (%s); %d crops go elsewhere", link.name, reason, len(link.outstanding))
        if link.ready:
            metrics.WORKER_FAILOVERS.inc()
        redo = sorted(link.outstanding.values(), key=lambda t: (t.frame, t.face))
        for task in redo:
            task.reset = True
        self._queue.extendleft(reversed(redo))
        link.outstanding.clear()
        for track in link.tracks:
            self._affinity.pop(track, None)
        link.tracks.clear()
        link.credits = 0
        link.reason = reason
