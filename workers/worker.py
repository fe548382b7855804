"""The inference worker: one per device. It binds a ZeroMQ ROUTER socket, hands out credits to
decoders, batches their crops across frames, tracks and jobs, runs the restorer, keeps each
track's temporal state, and replies.

It runs as a thread inside ``gpen-stream restore`` (``inproc://``) or as its own process
(``gpen-stream worker --endpoint ipc://...|tcp://...``). SIGTERM (or the stop event) makes it
finish the crops it already holds, then exit.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass

import numpy as np
import zmq

from workers import metrics, wire
from workers.restorers import Restorer
from workers.temporal import TemporalBlender

log = logging.getLogger(__name__)

HEARTBEAT_S = 1.0
DRAIN_QUIET_S = 0.5  # after a stop request, keep serving until nothing arrived for this long
DRAIN_MAX_S = 60.0


@dataclass
class _Pending:
    peer: bytes
    crop: wire.Crop
    pixels: np.ndarray
    arrived: float


class Worker:
    def __init__(self, restorers: dict[str, Restorer], *, batch: int, batch_wait_ms: float, blender: TemporalBlender,
                 credits: int = 0, device: str = "cpu", context: zmq.Context | None = None,
                 worker_id: str | None = None):
        self.restorers = restorers
        self.batch = batch
        self.batch_wait = batch_wait_ms / 1000
        self.window = credits or 2 * batch
        self.device = device
        self.blender = blender
        self.id = worker_id or f"worker-{uuid.uuid4().hex[:8]}"
        self.context = context or zmq.Context.instance()
        self.socket = self.context.socket(zmq.ROUTER)
        self.socket.setsockopt(zmq.LINGER, 1000)
        self.socket.setsockopt(zmq.MAXMSGSIZE, wire.MAX_MESSAGE_BYTES)
        self.endpoint: str | None = None
        self.stop_event = threading.Event()
        self._pending: dict[str, deque[_Pending]] = {name: deque() for name in restorers}
        self._peers: set[bytes] = set()  # decoders that said hello and not yet bye
        self._in_flight: dict[bytes, int] = {}  # crops held per decoder, at most the credits granted
        self._ending: set[tuple] = set()  # tracks to forget once their queued crops are done
        self._last_heartbeat = 0.0
        self.error: BaseException | None = None  # why serve() stopped, if it failed

    def bind(self, endpoint: str) -> str:
        """Bind and return the actual endpoint (tcp://host:0 picks a free port)."""
        self.socket.bind(endpoint)
        self.endpoint = self.socket.getsockopt_string(zmq.LAST_ENDPOINT)
        return self.endpoint

    def serve(self) -> None:
        """Until stop_event is set; then drain: crops already sent to us (received or still on
        the wire) are restored and returned, until the socket has been quiet a moment."""
        poller = zmq.Poller()
        poller.register(self.socket, zmq.POLLIN)
        log.info("worker %s serving %s on %s (%s)", self.id, ", ".join(self.restorers), self.endpoint, self.device)
        try:
            self._serve(poller)
        except BaseException as exc:
            self.error = exc
            log.exception("worker %s failed", self.id)
            raise
        finally:
            self.socket.close()
            log.info("worker %s stopped", self.id)

    def _serve(self, poller: zmq.Poller) -> None:
        while not self.stop_event.is_set():
            if poller.poll(self._poll_timeout_ms()):
                self._drain()
            self._run_ready_batches(flush=False)
            self._heartbeat()
        log.info("worker %s draining", self.id)
        give_up = time.monotonic() + DRAIN_MAX_S
        quiet_until = time.monotonic() + DRAIN_QUIET_S
        while time.monotonic() < min(quiet_until, give_up):
            if poller.poll(50 if self._peers else 0):
                self._drain()
                quiet_until = time.monotonic() + DRAIN_QUIET_S
            self._run_ready_batches(flush=True)
            if not self._peers:  # every decoder said bye: nothing more can be on its way
                break

    # ------------------------------------------------------------------ receive

    def _poll_timeout_ms(self) -> int:
        oldest = min((q[0].arrived for q in self._pending.values() if q), default=None)
        if oldest is None:
            return 100
        return max(0, int((oldest + self.batch_wait - time.monotonic()) * 1000))

    def _drain(self) -> None:
        while True:
            try:
                frames = self.socket.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            peer, body = frames[0].bytes, frames[1:]
            try:
                header, pixels = wire.decode(body)
            except wire.WireError as exc:
                metrics.WIRE_INVALID.labels(side="worker").inc()
                log.warning("dropped an invalid message from %s: %s", peer.hex(), exc)
                continue
            self._handle(peer, header, pixels)

    def _handle(self, peer: bytes, header, pixels) -> None:
        if isinstance(header, wire.Hello):
            self._peers.add(peer)
            self._send(peer, self._credit(self.window))
        elif isinstance(header, wire.Crop):
            reason = None
            if header.model not in self.restorers or self.restorers[header.model].size != header.size:
                reason = (f"model {header.model} at {header.size}px is not served here "
                          f"(serving {', '.join(self.restorers)})")
            elif self._in_flight.get(peer, 0) >= self.window:
                reason = f"more crops than the {self.window} credits granted"
            if reason is not None:
                self._send(peer, wire.Error(job=header.job, frame=header.frame, track=header.track, face=header.face,
                                            reason=reason, worker=self.id))
                return
            self._in_flight[peer] = self._in_flight.get(peer, 0) + 1
            self._pending[header.model].append(_Pending(peer, header, pixels, time.monotonic()))
        elif isinstance(header, wire.EndTrack):
            key = (peer, header.job, header.track)
            if any(key == (p.peer, p.crop.job, p.crop.track) for q in self._pending.values() for p in q):
                self._ending.add(key)  # crops of the track still queued: forget it after them
            else:
                self.blender.drop(key)
        elif isinstance(header, wire.Bye):
            self.blender.drop((peer, header.job))
            self._peers.discard(peer)
            self._in_flight.pop(peer, None)
        else:
            metrics.WIRE_INVALID.labels(side="worker").inc()
            log.warning("unexpected %s message from %s", header.kind, peer.hex())

    def _credit(self, credits: int) -> wire.Credit:
        return wire.Credit(worker=self.id, credits=credits, models=tuple(self.restorers), device=self.device)

    def _heartbeat(self) -> None:
        now = time.monotonic()
        if now - self._last_heartbeat >= HEARTBEAT_S:
            self._last_heartbeat = now
            for peer in self._peers:
                self._send(peer, self._credit(0))

    def _send(self, peer: bytes, header, pixels: np.ndarray | None = None) -> None:
        self.socket.send_multipart([peer, *wire.encode(header, pixels)], copy=False)

    # ------------------------------------------------------------------ restore

    def _run_ready_batches(self, *, flush: bool) -> None:
        now = time.monotonic()
        for name, queue in self._pending.items():
            while queue and (flush or len(queue) >= self.batch or now - queue[0].arrived >= self.batch_wait):
                items = [queue.popleft() for _ in range(min(self.batch, len(queue)))]
                self._restore(self.restorers[name], items)
                now = time.monotonic()

    def _restore(self, restorer: Restorer, items: list[_Pending]) -> None:
        now = time.time()
        late = [p for p in items if p.crop.deadline is not None and p.crop.deadline < now]
        items = [p for p in items if p not in late]
        for p in late:
            self._send_error(p, "deadline passed before the crop was restored")
        if not items:
            return
        started = time.perf_counter()
        try:
            restored = restorer.restore(np.stack([p.pixels for p in items]))
        except Exception as exc:  # a failing batch must not take the worker down
            log.exception("restoring a batch of %d failed", len(items))
            for p in items:
                self._send_error(p, f"{type(exc).__name__}: {exc}")
            return
        metrics.MODEL_SECONDS.labels(model=restorer.name).observe(time.perf_counter() - started)
        metrics.CROPS_RESTORED.labels(model=restorer.name).inc(len(items))
        for p, out in zip(items, restored):
            c = p.crop
            key = (p.peer, c.job, c.track)
            try:
                if c.temporal == "full":
                    out = self.blender.blend(key, c.frame, c.affine, p.pixels, out, reset=c.reset)
                else:
                    self.blender.drop(key)
            except Exception as exc:  # one crop's blending must not take the worker down
                log.exception("temporal blending failed for frame %d track %d", c.frame, c.track)
                self._send_error(p, f"temporal blending failed: {type(exc).__name__}: {exc}")
                continue
            result = wire.Result(job=c.job, frame=c.frame, track=c.track, face=c.face, model=c.model,
                                 size=c.size, shape=c.shape, worker=self.id)
            self._reply(p, result, out)
        for key in [k for k in self._ending if not any(
                k == (p.peer, p.crop.job, p.crop.track) for q in self._pending.values() for p in q)]:
            self._ending.discard(key)
            self.blender.drop(key)

    def _reply(self, p: _Pending, header, pixels: np.ndarray | None = None) -> None:
        self._in_flight[p.peer] = max(0, self._in_flight.get(p.peer, 0) - 1)
        self._send(p.peer, header, pixels)

    def _send_error(self, p: _Pending, reason: str) -> None:
        c = p.crop
        self._reply(p, wire.Error(job=c.job, frame=c.frame, track=c.track, face=c.face, reason=reason,
                                  worker=self.id))
