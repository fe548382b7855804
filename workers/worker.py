"""The inference worker: one per device. It binds a ZeroMQ ROUTER socket, hands out credits to
decoders, batches their crops across frames, tracks and jobs, runs the restorer, keeps each
track's temporal state, and replies.

It runs as a thread inside ``gpen-stream restore`` (``inproc://``) or as its own process
(``gpen-stream worker --endpoint ipc://...|tcp://...``). SIGTERM (or the stop event) makes it
tell its decoders it is leaving (they send it nothing more and say they heard), then leave the
Redis registry, restore the crops it holds and those that reach it before each decoder heard,
then exit.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
import uuid
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
import zmq

from workers import metrics, wire
from workers.restorers import Restorer
from workers.batching import take_batch
from workers.temporal import TemporalBlender, to_device

log = logging.getLogger(__name__)


def single_torch_thread() -> None:
    """Makes torch run the calling thread's CPU work on that one thread (the blend thread's
    initializer). Its many small ops gain little from OpenMP, and on cores shared with the model
    or with decoders each of them can wait a scheduler tick for a helper thread. torch gives a
    thread its count from the process-wide default on first use, so that comes first; setting
    this thread's count also sets that default, which the caller must put back."""
    torch.get_num_threads()
    torch.set_num_threads(1)


DRAIN_HEARD_S = 5.0  # after a stop request: how long to wait for a decoder to say it heard (then it is gone)
DRAIN_MAX_S = 25.0  # within compose's 30 s stop_grace_period
# A model's run-time estimate halves for every this many seconds it has not run: an estimate
# made stale by one slow batch (a warm-up) cannot shed a model's deadline crops for ever
ESTIMATE_HALF_LIFE_S = 5.0
TOO_LATE = "the deadline passes before the crop could be restored"


@dataclass
class _Pending:
    peer: bytes
    crop: wire.Crop
    pixels: np.ndarray
    arrived: float  # time.monotonic()
    session: int  # the decoder's session it came in (a hello opens a new one)
    deadline: float | None  # time.monotonic() after which its result is useless (live jobs)


@dataclass
class _Batch:
    """Crops on their way through the model thread, then the blend thread; their tracks are held
    in the blender until replied."""
    restorer: Restorer
    items: list[_Pending]
    keys: list[tuple]  # (peer, job, track) per crop
    modelled: Future  # the model thread is done with it: -> (input crops, restored crops, their CUDA event or None)
    outcome: Future  # the blend thread is done with it: -> (N x S x S x 3 uint8 outputs, {index: why it failed})


class Worker:
    def __init__(self, restorers: dict[str, Restorer], *, batch: int, batch_wait_ms: float, blender: TemporalBlender,
                 credits: int = 0, device: str = "cpu", context: zmq.Context | None = None,
                 worker_id: str | None = None, peer_timeout_s: float = wire.PEER_TIMEOUT_S, residency=None):
        self.restorers = restorers  # name -> Restorer, or ResidentRestorer (loaded on demand)
        self.residency = residency  # workers.residency.Residency, when models load on demand
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
        # set when the drain gives up: a load waiting for memory ends then (not at the stop: the
        # crops it would serve are ones the worker promised to finish)
        self._abandon = threading.Event()
        if residency is not None:
            residency.stop = self._abandon
        self._pending: dict[str, deque[_Pending]] = {name: deque() for name in restorers}
        self._peers: dict[bytes, float] = {}  # decoders that said hello and not yet bye -> last heard
        self._sessions: dict[bytes, int] = {}  # decoder -> its session (replies of an earlier one are not sent)
        self._session_count = 0
        self.on_stopping: list = []  # called once when a stop begins (e.g. leave the Redis registry)
        self.lease_lost = threading.Event()  # set by the memory lease's thread (workers.budget.GpuBudget.on_lost)
        self._heard_leaving: set[bytes] = set()  # decoders that answered our "leaving"
        self.peer_timeout_s = peer_timeout_s
        self._in_flight: dict[bytes, int] = {}  # crops held per decoder, at most the credits granted
        self._ending: set[tuple] = set()  # tracks to forget once their queued crops are done
        self._last_heartbeat = 0.0
        self.error: BaseException | None = None  # why serve() stopped, if it failed
        self.restored = 0  # crops sent back restored, in all
        # a batch goes through the model in one thread and is blended in another, so the model
        # takes the next batch while the last is blended, and this thread receives and decodes
        # meanwhile; each stage wakes this thread's poll when it is done with a batch
        self._model_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")
        threads = torch.get_num_threads()
        self._blend_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="blend",
                                                initializer=single_torch_thread)
        self._blend_thread.submit(lambda: None).result()  # its initializer has run...
        torch.set_num_threads(threads)  # ...and changed the process-wide default: put it back
        # on a GPU the blend thread queues its work on a stream of its own: its one wait for the
        # GPU (the outputs' copy to the host) then waits for its own work only, not for the next
        # batch the model thread has queued meanwhile (on one stream that wait took the model's)
        self._blend_streams: dict[torch.device, torch.cuda.Stream] = {}
        self._batches: deque[_Batch] = deque()  # oldest first
        self._model_s: dict[str, float] = {}  # per model: how long a batch took lately (moving average)
        self._model_ran: dict[str, float] = {}  # per model: time.monotonic() when a batch last finished
        self._wake, self._woken = socket.socketpair()
        self._woken.setblocking(False)

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
        poller.register(self._woken, zmq.POLLIN)  # the model thread finished a batch
        log.info("worker %s serving %s on %s (%s)", self.id, ", ".join(self.restorers), self.endpoint, self.device)
        try:
            # on a GPU the blend's CUDA graphs are captured now, before the model thread runs
            # (a capture must not meet a model unloading or an out-of-memory retry)
            self.blender.prepare(torch.device(self.device), self.batch)
            self._serve(poller)
        except BaseException as exc:
            self.error = exc
            log.exception("worker %s failed", self.id)
            raise
        finally:
            self._abandon.set()  # a load still waiting for memory gives up: nothing will wait for its batch
            self._model_thread.shutdown(wait=True)  # batches still in the model and the blender end first
            self._blend_thread.shutdown(wait=True)
            self.socket.close()
            self._wake.close()
            self._woken.close()
            log.info("worker %s stopped", self.id)

    def _serve(self, poller: zmq.Poller) -> None:
        while not self.stop_event.is_set():
            if poller.poll(self._poll_timeout_ms()):
                self._drain()
            self._run_ready_batches(flush=False)
            self._heartbeat()
        left = time.monotonic()
        self._leave()
        # The crops it holds are finished, and so are those that reach it before a decoder
        # heard it leave (at most the credits it granted): a decoder answers "leaving" and
        # sends nothing after, so once every decoder answered (or had DRAIN_HEARD_S to) and
        # nothing is held, nothing more can come.
        give_up = left + DRAIN_MAX_S
        while time.monotonic() < give_up:
            if poller.poll(50):
                self._drain()
            self._run_ready_batches(flush=False, partial=True)
            self._heartbeat()  # a decoder takes a leaving worker that goes silent for gone
            held = self._batches or any(self._pending.values())
            heard = set(self._peers) <= self._heard_leaving or time.monotonic() - left >= DRAIN_HEARD_S
            if not held and heard:
                break
        if self._batches or any(self._pending.values()):
            log.warning("worker %s stops with crops unfinished after %.0f s of draining; their decoders send them "
                        "elsewhere", self.id, DRAIN_MAX_S)

    def _leave(self) -> None:
        """The stop begins: tell every decoder, then leave the registry (a decoder that saw us
        gone from it before it heard would take us for dead and send our crops elsewhere)."""
        log.info("worker %s draining", self.id)
        for peer in self._peers:
            self._send(peer, wire.Leaving(worker=self.id))
        for callback in self.on_stopping:
            try:
                callback()
            except Exception:  # leaving the registry must not stop the drain
                log.exception("worker %s: a stop callback failed", self.id)

    # ------------------------------------------------------------------ receive

    def _poll_timeout_ms(self) -> int:
        if self._batches and not self._batches[-1].modelled.done():
            return 100  # no batch can start before the model is done, and that wakes the poll
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
            if peer in self._peers:
                self._peers[peer] = time.monotonic()
            self._handle(peer, header, pixels)

    def _handle(self, peer: bytes, header, pixels) -> None:
        if isinstance(header, wire.Hello):
            self._hello(peer)
        elif isinstance(header, wire.Crop):
            self._accept_crop(peer, header, pixels)
        elif isinstance(header, wire.EndTrack):
            key = (peer, header.job, header.track)
            if any(key == (p.peer, p.crop.job, p.crop.track) for q in self._pending.values() for p in q):
                self._ending.add(key)  # crops of the track still queued: forget it after them
            else:
                self.blender.drop(key)
        elif isinstance(header, wire.Ping):
            if peer not in self._peers:  # it thinks we hold its crops: they were lost (a restart, or a silence)
                self._send(peer, wire.Forgot(worker=self.id))
        elif isinstance(header, wire.Bye):
            self._forget_peer(peer)
        elif isinstance(header, wire.Leaving):  # a decoder heard we leave: nothing more comes from it
            self._heard_leaving.add(peer)
        else:
            metrics.WIRE_INVALID.labels(side="worker").inc()
            log.warning("unexpected %s message from %s", header.kind, peer.hex())

    def _hello(self, peer: bytes) -> None:
        """A new session with this decoder: whatever it sent before is forgotten (it re-sends
        what it has not had answered), and it gets the whole window."""
        if self.stop_event.is_set():
            self._send(peer, wire.Leaving(worker=self.id))
            return
        if peer in self._peers:
            self._forget_peer(peer)
        self._session_count += 1
        self._peers[peer], self._sessions[peer] = time.monotonic(), self._session_count
        self._send(peer, self._credit(self.window))

    def _accept_crop(self, peer: bytes, crop: wire.Crop, pixels: np.ndarray) -> None:
        if peer not in self._peers:  # never greeted, or forgotten after going silent: no credits granted
            self._send(peer, wire.Forgot(worker=self.id))
            return
        reason = None
        if crop.model not in self.restorers or self.restorers[crop.model].size != crop.size:
            reason = f"model {crop.model} at {crop.size}px is not served here (serving {', '.join(self.restorers)})"
        elif self._in_flight.get(peer, 0) >= self.window:
            reason = f"more crops than the {self.window} credits granted"
        if reason is not None:
            self._send(peer, wire.Error(job=crop.job, frame=crop.frame, track=crop.track, face=crop.face,
                                        reason=reason, worker=self.id))
            return
        self._in_flight[peer] = self._in_flight.get(peer, 0) + 1
        arrived = time.monotonic()
        deadline = None if crop.time_left_s is None else arrived + crop.time_left_s
        self._pending[crop.model].append(_Pending(peer, crop, pixels, arrived, self._sessions[peer], deadline))

    def _forget_peer(self, peer: bytes) -> None:
        """Drop everything a decoder left here: its temporal state, queued crops and credits."""
        self.blender.drop((peer,))
        self._peers.pop(peer, None)
        self._sessions.pop(peer, None)
        self._in_flight.pop(peer, None)
        for queue in self._pending.values():
            kept = [p for p in queue if p.peer != peer]
            queue.clear()
            queue.extend(kept)
        self._ending = {key for key in self._ending if key[0] != peer}

    def _expire_silent_peers(self, now: float) -> None:
        for peer, heard in list(self._peers.items()):
            if now - heard > self.peer_timeout_s:
                log.warning("decoder %s silent for %.0f s: forgetting it and its state", peer.hex(), now - heard)
                metrics.PEERS_EXPIRED.inc()
                self._forget_peer(peer)

    def status(self) -> dict:
        """What the registry publishes about this worker (read from another thread: plain reads)."""
        queued = sum(len(q) for q in self._pending.values())
        return {"models": list(self.restorers), "batch": self.batch,
                "loaded": [n for n, r in self.restorers.items() if getattr(r, "loaded", True)],
                "credits": self.window, "load": queued + sum(self._in_flight.values()), "restored": self.restored}

    def _credit(self, credits: int) -> wire.Credit:
        return wire.Credit(worker=self.id, credits=credits, models=tuple(self.restorers), device=self.device)

    def _heartbeat(self) -> None:
        now = time.monotonic()
        if now - self._last_heartbeat >= wire.HEARTBEAT_S:
            self._last_heartbeat = now
            self._expire_silent_peers(now)
            if self.residency is not None and self.lease_lost.is_set():  # in the model thread, after its batches
                self.lease_lost.clear()
                log.error("worker %s lost its memory lease to other workers: unloading its models until it has "
                          "one again", self.id)
                self._model_thread.submit(self.residency.unload_all, why="the memory lease was lost")
            if self.residency is not None and not self._batches:  # in the model thread: never under a batch
                self._model_thread.submit(self.residency.unload_idle)
            for peer in self._peers:
                self._send(peer, self._credit(0))

    def _send(self, peer: bytes, header, pixels: np.ndarray | None = None) -> None:
        self.socket.send_multipart([peer, *wire.encode(header, pixels)], copy=False)

    # ------------------------------------------------------------------ restore

    def _run_ready_batches(self, *, flush: bool, partial: bool = False) -> None:
        """The model thread takes the next ready batch as soon as it is free; replies go out, in
        order, for the batches the blend thread is done with. ``flush``: return only once
        everything queued has been restored and replied. ``partial``: a batch need not wait
        to fill (the worker is draining)."""
        while True:
            self._clear_wake()
            if not self._batches or self._batches[-1].modelled.done():
                batch = self._start_next(flush or partial)
                if batch is not None:
                    self._batches.append(batch)
            else:
                self._shed_hopeless()
            while self._batches and (flush or self._batches[0].outcome.done()):
                self._finish(self._batches.popleft())
            if not flush or (not self._batches and not any(self._pending.values())):
                return

    def _clear_wake(self) -> None:
        try:
            while self._woken.recv(4096):
                pass
        except BlockingIOError:
            pass

    def _estimate(self, name: str) -> float:
        """How long a batch of ``name`` takes, as far as we know (see ESTIMATE_HALF_LIFE_S)."""
        idle_s = time.monotonic() - self._model_ran.get(name, time.monotonic())
        return self._model_s.get(name, 0.0) * 0.5 ** (idle_s / ESTIMATE_HALF_LIFE_S)

    def _shed_hopeless(self) -> None:
        """While the model is busy: answer at once the queued crops that could not make their
        deadline even if the model were free now, so their frames go out without waiting for
        the deadline (a live job's latency under overload is then the detector's, not the
        deadline's)."""
        now = time.monotonic()
        for name, queue in self._pending.items():
            soonest = now + self._estimate(name)
            late = [p for p in queue if p.deadline is not None and p.deadline < soonest]
            if late:
                gone = {id(p) for p in late}  # by identity: _Pending holds arrays, == would compare them
                self._pending[name] = deque(p for p in queue if id(p) not in gone)
                for p in late:
                    self._send_error(p, TOO_LATE)

    def _start_next(self, flush: bool) -> _Batch | None:
        """The ready queue whose oldest crop waited longest: up to ``batch`` of its crops
        (``workers.batching``: deadlines first, then its decoders in turn) go to the model
        thread (those past their deadline are answered here instead)."""
        while True:
            now = time.monotonic()
            ready = [(q[0].arrived, name) for name, q in self._pending.items()
                     if q and (flush or len(q) >= self.batch or now - q[0].arrived >= self.batch_wait)]
            if not ready:
                return None
            name = min(ready)[1]
            queue = self._pending[name]
            items, late = [], []
            # when this batch would come back: after the batches ahead of it and its own run
            # (as long as the model took lately); a crop that cannot make its deadline is
            # answered now, so that under overload the others still make theirs
            done_at = time.monotonic() + (len(self._batches) + 1) * self._estimate(name)
            while len(items) < self.batch and queue:  # a full batch of crops that can still make it
                for p in take_batch(queue, self.batch - len(items)):  # deadlines first, then decoders in turn
                    (late if p.deadline is not None and p.deadline < done_at else items).append(p)
            for p in late:
                self._send_error(p, TOO_LATE)
            if items:
                break
        restorer = self.restorers[name]
        keys = [(p.peer, p.crop.job, p.crop.track) for p in items]
        self.blender.hold(keys)  # an end of track or bye arriving meanwhile waits for these crops
        modelled = self._model_thread.submit(self._run_model, restorer, [p.pixels for p in items])
        outcome = self._blend_thread.submit(self._blend, restorer, [p.crop for p in items], keys, modelled)
        for stage in (modelled, outcome):
            stage.add_done_callback(lambda _: self._wake.send(b"\0"))
        return _Batch(restorer, items, keys, modelled, outcome)

    def _run_model(self, restorer: Restorer, pixels: list[np.ndarray]
                   ) -> tuple[np.ndarray | torch.Tensor, torch.Tensor, torch.cuda.Event | None]:
        """In the model thread: the input crops (on a GPU uploaded there once, for the model and
        the blend; elsewhere a host array), the restored ones (on the model's device) and, on a
        GPU, an event that marks them done there (the model's work is only queued)."""
        batch = np.stack(pixels)
        load = getattr(restorer, "load", None)
        if load is not None:  # a model loaded on demand: the load is not the run (deadlines are judged by the run)
            load()
        started = time.perf_counter()
        if restorer.device.type == "cuda":
            batch = to_device(torch.from_numpy(batch), restorer.device)
        restored = restorer.run(batch, on_device=True)
        took = time.perf_counter() - started
        metrics.MODEL_SECONDS.labels(model=restorer.name).observe(took)
        self._model_s[restorer.name] = 0.7 * self._model_s.get(restorer.name, took) + 0.3 * took
        self._model_ran[restorer.name] = time.monotonic()
        ready = None
        if restored.is_cuda:
            ready = torch.cuda.Event()
            ready.record(torch.cuda.current_stream(restored.device))
        return batch, restored, ready

    def _blend_stream(self, device: torch.device) -> torch.cuda.Stream | None:
        """The blend thread's CUDA stream on ``device`` (None off a GPU)."""
        if device.type != "cuda":
            return None
        if device not in self._blend_streams:
            self._blend_streams[device] = torch.cuda.Stream(device)
        return self._blend_streams[device]

    def _blend(self, restorer: Restorer, crops: list[wire.Crop], keys: list[tuple],
               modelled: Future) -> tuple[np.ndarray, dict[int, str]]:
        """In the blend thread, once the model is done with the batch (its error is this one's):
        one temporal blend for all the crops that ask for it, on the model's device. Returns the
        uint8 outputs and, for crops that failed, why."""
        batch, restored, ready = modelled.result()
        stream = self._blend_stream(restored.device)
        if stream is None:
            return self._blend_here(crops, keys, batch, restored, restorer.dtype)
        with torch.cuda.stream(stream):
            stream.wait_event(ready)  # the model's outputs, done on its stream
            for tensor in (batch, restored):  # their memory is not reused before this stream is done with them
                if isinstance(tensor, torch.Tensor) and tensor.is_cuda:
                    tensor.record_stream(stream)
            return self._blend_here(crops, keys, batch, restored, restorer.dtype)

    def _blend_here(self, crops: list[wire.Crop], keys: list[tuple], batch: np.ndarray | torch.Tensor,
                    restored: torch.Tensor, run_dtype: torch.dtype) -> tuple[np.ndarray, dict[int, str]]:
        """_blend on the current stream. Its only wait for a GPU is the copy of the outputs to
        the host at the end (copies to it are queued: workers.temporal.to_device)."""
        outputs = restored.to(torch.uint8)  # whole numbers already
        full = [i for i, c in enumerate(crops) if c.temporal == "full"]
        for i, c in enumerate(crops):
            if c.temporal != "full":
                self.blender.drop(keys[i])
        failed = {}
        if full:
            try:
                every = len(full) == len(crops)
                where = None if every else to_device(torch.tensor(full), restored.device)
                inputs = to_device(torch.as_tensor(batch), restored.device)  # there already on a GPU
                blended = self.blender.blend_batch(
                    [keys[i] for i in full], [crops[i].frame for i in full], [crops[i].affine for i in full],
                    inputs if every else inputs.index_select(0, where),
                    restored if every else restored.index_select(0, where), [crops[i].reset for i in full],
                    run_dtype=run_dtype)
                outputs = blended if every else outputs.index_copy(0, where, blended)
            except Exception as exc:  # blending must not take the worker down, nor the other crops
                log.exception("temporal blending failed for a batch of %d crops", len(full))
                for i in full:
                    self.blender.drop(keys[i])
                    failed[i] = f"temporal blending failed: {type(exc).__name__}: {exc}"
        return outputs.contiguous().cpu().numpy(), failed  # HWC per crop, as the wire sends it

    def _finish(self, batch: _Batch) -> None:
        """Reply for a batch the blend thread is done with (waiting for it if need be)."""
        try:
            outputs, failed = batch.outcome.result()
        except Exception as exc:  # a failing batch must not take the worker down
            log.exception("restoring a batch of %d failed", len(batch.items))
            outputs, failed = None, {i: f"{type(exc).__name__}: {exc}" for i in range(len(batch.items))}
        else:
            metrics.CROPS_RESTORED.labels(model=batch.restorer.name).inc(len(batch.items))
        for i, p in enumerate(batch.items):
            if self._sessions.get(p.peer) != p.session:
                continue  # its decoder left (bye, silence, a new hello) while the crop was in the model
            c = p.crop
            if i in failed:
                self._send_error(p, failed[i])
            else:
                result = wire.Result(job=c.job, frame=c.frame, track=c.track, face=c.face, model=c.model,
                                     size=c.size, shape=c.shape, worker=self.id)
                self._reply(p, result, outputs[i])
        self.blender.release(batch.keys)
        for key in [k for k in self._ending if not any(
                k == (p.peer, p.crop.job, p.crop.track) for q in self._pending.values() for p in q)]:
            self._ending.discard(key)
            self.blender.drop(key)

    def _reply(self, p: _Pending, header, pixels: np.ndarray | None = None) -> None:
        self._in_flight[p.peer] = max(0, self._in_flight.get(p.peer, 0) - 1)
        self.restored += isinstance(header, wire.Result)
        self._send(p.peer, header, pixels)

    def _send_error(self, p: _Pending, reason: str) -> None:
        c = p.crop
        self._reply(p, wire.Error(job=c.job, frame=c.frame, track=c.track, face=c.face, reason=reason,
                                  worker=self.id))
