"""Temporal blending inside a worker: one batched blend per model batch, run in the model
thread while the receive loop keeps answering, and ends of tracks that overtake their last
crops. Real sockets and threads; decoders are plain DEALER sockets speaking the wire format."""

import threading
import time
import uuid

import cv2
import numpy as np
import torch
import zmq

from streamer.faces.align import alignment
from tests.support.clips import ASTRONAUT_LANDMARKS, astronaut
from workers import wire
from workers.restorers import IdentityRestorer
from workers.temporal import TemporalBlender
from workers.worker import Worker

SIZE = 64


class SlowRestorer(IdentityRestorer):
    """The identity, taking ``seconds`` per batch; records the batch sizes."""

    def __init__(self, seconds: float):
        super().__init__("identity", SIZE)
        self.seconds = seconds
        self.batches: list[int] = []

    def restore(self, crops):
        self.batches.append(len(crops))
        time.sleep(self.seconds)
        return crops.copy()


class CountingBlender(TemporalBlender):
    def __init__(self):
        super().__init__(0.85, 0.03)
        self.calls: list[int] = []

    def blend_batch(self, keys, *args, **kwargs):
        self.calls.append(len(keys))
        return super().blend_batch(keys, *args, **kwargs)


def _serve(restorer, blender, batch):
    worker = Worker({"identity": restorer}, batch=batch, batch_wait_ms=30, blender=blender,
                    context=zmq.Context.instance())
    endpoint = worker.bind(f"inproc://temporal-{uuid.uuid4().hex}")
    thread = threading.Thread(target=worker.serve, daemon=True)
    thread.start()
    return worker, thread, endpoint


def _stop(worker, thread, *sockets):
    for s in sockets:
        s.close(linger=0)
    worker.stop_event.set()
    thread.join(10)
    assert not thread.is_alive()


def _decoder(endpoint, job="job"):
    dealer = zmq.Context.instance().socket(zmq.DEALER)
    dealer.connect(endpoint)
    dealer.send_multipart(wire.encode(wire.Hello(job=job)))
    assert _next(dealer).kind == "credit"
    return dealer


def _next(dealer, timeout_ms=10000):
    assert dealer.poll(timeout_ms), "no reply"
    header, pixels = wire.decode(dealer.recv_multipart())
    return header


def _kinds(dealer, within_s):
    """The kinds of the messages that arrive within ``within_s`` (heartbeat credits included)."""
    kinds, deadline = [], time.monotonic() + within_s
    while dealer.poll(max(0, int((deadline - time.monotonic()) * 1000))):
        kinds.append(wire.decode(dealer.recv_multipart())[0].kind)
    return kinds


def _results(dealer, n, timeout_ms=10000):
    out = {}
    while len(out) < n:
        assert dealer.poll(timeout_ms), f"{len(out)} of {n} replies"
        header, pixels = wire.decode(dealer.recv_multipart())
        if header.kind in ("result", "error"):
            assert header.kind == "result", header.reason
            out[(header.track, header.frame)] = pixels
    return out


_rng = np.random.default_rng(0)


def _crop(frame: int):
    """A face crop with ~1.5 px of landmark jitter and noise: (affine, pixels)."""
    affine = alignment(ASTRONAUT_LANDMARKS + _rng.normal(0, 1.5, ASTRONAUT_LANDMARKS.shape), SIZE)
    crop = cv2.warpAffine(astronaut(), affine, (SIZE, SIZE), flags=cv2.INTER_CUBIC)
    return affine, np.clip(crop + _rng.normal(0, 8, crop.shape), 0, 255).astype(np.uint8)


def _send(dealer, frame, track, crop, job="job"):
    affine, pixels = crop
    header = wire.Crop(job=job, frame=frame, track=track, face=0, model="identity", size=SIZE, shape=pixels.shape,
                       affine=tuple(map(tuple, affine.tolist())), temporal="full")
    dealer.send_multipart(wire.encode(header, pixels))


def test_one_batched_blend_per_model_batch():
    restorer, blender = SlowRestorer(0.0), CountingBlender()
    worker, thread, endpoint = _serve(restorer, blender, batch=4)
    dealer = _decoder(endpoint)
    for frame in range(4):
        for track in range(2):  # frames of two tracks, in batches of four
            _send(dealer, frame, track, _crop(frame))
    results = _results(dealer, 8)
    assert len(results) == 8
    assert blender.calls == restorer.batches and sum(blender.calls) == 8
    assert len(blender) == 2
    _stop(worker, thread, dealer)


def test_the_blend_thread_runs_torch_on_one_thread_and_leaves_the_rest_alone():
    threads = torch.get_num_threads()
    worker, thread, endpoint = _serve(SlowRestorer(0.0), TemporalBlender(0.85, 0.03), batch=1)
    assert worker._blend_thread.submit(torch.get_num_threads).result() == 1
    assert torch.get_num_threads() == threads
    assert worker._model_thread.submit(torch.get_num_threads).result() == threads
    _stop(worker, thread)


def test_the_worker_keeps_answering_while_the_model_runs():
    worker, thread, endpoint = _serve(SlowRestorer(1.0), TemporalBlender(0.85, 0.03), batch=1)
    first = _decoder(endpoint, "first")
    _send(first, 0, 0, _crop(0), job="first")
    time.sleep(0.2)  # the crop is in the model now
    asked = time.monotonic()
    second = _decoder(endpoint, "second")  # hello -> credit, answered by the receive loop
    assert time.monotonic() - asked < 0.5
    assert "result" not in _kinds(first, 0)  # the first crop is not back yet
    assert _results(first, 1)
    _stop(worker, thread, first, second)


def test_an_end_of_track_that_overtakes_its_last_crop_waits_for_it():
    blender = TemporalBlender(0.85, 0.03)
    worker, thread, endpoint = _serve(SlowRestorer(0.5), blender, batch=1)
    dealer = _decoder(endpoint)
    crops = [_crop(0), _crop(1)]
    _send(dealer, 0, 7, crops[0])
    _results(dealer, 1)
    _send(dealer, 1, 7, crops[1])
    time.sleep(0.2)  # frame 1 is in the model: the decoder already ended the track
    dealer.send_multipart(wire.encode(wire.EndTrack(job="job", track=7)))
    out = _results(dealer, 1)[(7, 1)]
    assert np.abs(out.astype(float) - crops[1][1]).mean() > 1  # blended with frame 0, not started afresh
    deadline = time.monotonic() + 5
    while len(blender) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(blender) == 0  # and then forgotten
    _stop(worker, thread, dealer)


def test_a_decoder_that_leaves_while_its_crops_are_in_the_model_leaves_no_state():
    blender = TemporalBlender(0.85, 0.03)
    worker, thread, endpoint = _serve(SlowRestorer(0.5), blender, batch=2)
    dealer = _decoder(endpoint)
    _send(dealer, 0, 0, _crop(0))
    _send(dealer, 0, 1, _crop(0))
    time.sleep(0.2)
    dealer.send_multipart(wire.encode(wire.Bye(job="job")))
    assert not {"result", "error"} & set(_kinds(dealer, 1.0))  # nothing for a decoder that said bye
    assert len(blender) == 0
    _stop(worker, thread, dealer)
