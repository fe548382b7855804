"""Workers and the decoder's dispatcher over real ZeroMQ sockets, threads and processes."""

import os
import signal
import subprocess
import sys
import threading
import time
import uuid

import numpy as np
import pytest
import zmq

from streamer.dispatch import CropTask, DispatchError, Dispatcher, FrameTask, WorkerLink
from workers import metrics, wire
from workers.restorers import IdentityRestorer
from workers.temporal import TemporalBlender
from workers.worker import Worker

SIZE = 16


class RecordingRestorer(IdentityRestorer):
    def __init__(self, fail: bool = False):
        super().__init__("identity", SIZE)
        self.batches: list[int] = []
        self.fail = fail

    def restore(self, crops):
        self.batches.append(len(crops))
        if self.fail:
            raise RuntimeError("the model fell over")
        return crops[:, ::-1].copy()  # recognisable: flipped vertically


def _start_thread_worker(restorer, endpoint=None, **kw):
    kw = {"batch": 4, "batch_wait_ms": 20, "blender": TemporalBlender(0.85, 0.03)} | kw
    worker = Worker({"identity": restorer}, context=zmq.Context.instance(), **kw)
    endpoint = worker.bind(endpoint or f"inproc://test-{uuid.uuid4().hex}")
    thread = threading.Thread(target=worker.serve, daemon=True)
    thread.start()
    return worker, thread, endpoint


def _frames(n_frames, faces_per_frame=1, tracks=None, start=0):
    rng = np.random.default_rng(start)
    out = []
    for f in range(start, start + n_frames):
        task = FrameTask(f, item=None)
        for face in range(faces_per_frame):
            crop = rng.integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8)
            track = tracks[face] if tracks else face
            task.crops.append(CropTask(f, face, track, np.eye(2, 3), crop))
        out.append(task)
    return out


def _run(dispatcher, tasks, timeout=30.0, on_pump=None):
    for t in tasks:
        dispatcher.submit(t)
    done, deadline = [], time.monotonic() + timeout
    while len(done) < len(tasks):
        done += dispatcher.pump(20)
        if on_pump:
            on_pump()
        assert time.monotonic() < deadline, "dispatch did not finish"
    return done


def _dispatcher(endpoints, **kw):
    links = [WorkerLink(zmq.Context.instance(), e) for e in endpoints]
    d = Dispatcher(links, job="job-1", model="identity", size=SIZE, temporal=kw.pop("temporal", "off"),
                   timeout_s=kw.pop("timeout_s", 30))
    d.wait_ready(30)
    return d


def test_crops_come_back_restored_and_credits_bound_what_is_in_flight():
    restorer = RecordingRestorer()
    worker, thread, endpoint = _start_thread_worker(restorer, batch=4, batch_wait_ms=5, credits=6)
    d = _dispatcher([endpoint])
    link = d.links[0]
    peak = []
    tasks = _frames(30, faces_per_frame=2)
    done = _run(d, tasks, on_pump=lambda: peak.append(len(link.outstanding)))
    assert max(peak) <= 6
    for task in done:
        for crop in task.crops:
            assert np.array_equal(task.restored[crop.face], crop.crop[::-1])
    d.close()
    worker.stop_event.set()
    thread.join(5)


def test_the_worker_batches_crops_across_frames():
    restorer = RecordingRestorer()
    worker, thread, endpoint = _start_thread_worker(restorer, batch=4, batch_wait_ms=200, credits=8)
    d = _dispatcher([endpoint])
    _run(d, _frames(8))  # one face per frame: batches must span frames
    assert max(restorer.batches) == 4 and sum(restorer.batches) == 8
    d.close()
    worker.stop_event.set()
    thread.join(5)


def test_a_track_sticks_to_one_worker():
    workers = [_start_thread_worker(RecordingRestorer(), batch=2, batch_wait_ms=5) for _ in range(2)]
    d = _dispatcher([w[2] for w in workers])
    seen: dict[int, set] = {}
    original = d._handle

    def spy(link, header, pixels):
        if isinstance(header, wire.Result):
            seen.setdefault(header.track, set()).add(header.worker)
        original(link, header, pixels)

    d._handle = spy
    _run(d, _frames(20, faces_per_frame=4))
    assert len(seen) == 4 and all(len(w) == 1 for w in seen.values())
    assert len({w for ws in seen.values() for w in ws}) == 2  # the load is spread
    d.close()
    for w, t, _ in workers:
        w.stop_event.set()
        t.join(5)


def test_a_failing_model_fails_the_job_with_its_reason():
    worker, thread, endpoint = _start_thread_worker(RecordingRestorer(fail=True), batch=1, batch_wait_ms=1)
    d = _dispatcher([endpoint])
    with pytest.raises(DispatchError, match="the model fell over"):
        _run(d, _frames(2))
    d.close()
    worker.stop_event.set()
    thread.join(5)


def test_a_worker_serving_another_model_is_not_used():
    worker, thread, endpoint = _start_thread_worker(RecordingRestorer())
    links = [WorkerLink(zmq.Context.instance(), endpoint)]
    d = Dispatcher(links, job="j", model="GPEN-BFR-512", size=512, temporal="off", timeout_s=5)
    with pytest.raises(DispatchError, match="serves identity, not GPEN-BFR-512"):
        d.wait_ready(10)
    d.close()
    worker.stop_event.set()
    thread.join(5)


def test_invalid_messages_are_dropped_counted_and_the_worker_keeps_serving():
    worker, thread, endpoint = _start_thread_worker(RecordingRestorer(), batch=1, batch_wait_ms=1)
    before = metrics.WIRE_INVALID.labels(side="worker")._value.get()
    rogue = zmq.Context.instance().socket(zmq.DEALER)
    rogue.connect(endpoint)
    rogue.send_multipart([b"\x80\x04garbage"])
    rogue.send_multipart([wire.Crop(job="j", frame=0, track=0, face=0, model="identity", size=SIZE,
                                    shape=(SIZE, SIZE, 3), affine=((1, 0, 0), (0, 1, 0))).model_dump_json().encode(),
                          b"short"])
    d = _dispatcher([endpoint])
    _run(d, _frames(3))
    assert metrics.WIRE_INVALID.labels(side="worker")._value.get() - before == 2
    assert thread.is_alive()
    rogue.close()
    d.close()
    worker.stop_event.set()
    thread.join(5)


def _spawn_worker(endpoint, *extra):
    env = {**os.environ, "GPEN_STREAM_WORKER_BATCH": "2", "GPEN_STREAM_WORKER_BATCH_WAIT_MS": "5"}
    return subprocess.Popen([sys.executable, "-m", "streamer", "worker", "--endpoint", endpoint, "--model", "identity",
                             *extra], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _wait_ready(d, procs):
    try:
        d.wait_ready(60)
    except DispatchError:
        for p in procs:
            p.kill()
        raise AssertionError("workers did not start: " + " | ".join(p.stderr.read().decode()[-500:] for p in procs))


def test_when_a_worker_process_dies_its_crops_are_redone_elsewhere(tmp_path):
    """Identity workers at 512 px in real processes; one is killed in the middle of the job."""
    endpoints = [f"ipc://{tmp_path}/w{i}.sock" for i in range(2)]
    procs = [_spawn_worker(e) for e in endpoints]
    links = [WorkerLink(zmq.Context.instance(), e, is_alive=lambda p=p: p.poll() is None) for e, p in zip(endpoints, procs)]
    d = Dispatcher(links, job="job-f", model="identity", size=512, temporal="full", timeout_s=30)
    _wait_ready(d, procs)
    rng = np.random.default_rng(0)
    tasks = []
    for f in range(40):
        task = FrameTask(f, item=None)
        for face in range(2):
            task.crops.append(CropTask(f, face, face, np.eye(2, 3), rng.integers(0, 255, (512, 512, 3), np.uint8)))
        tasks.append(task)
    killed = []

    def kill_one():
        busy = [lk for lk in links if lk.outstanding]
        if not killed and busy and sum(len(t.restored) for t in tasks) > 10:
            victim = procs[links.index(busy[0])]
            victim.send_signal(signal.SIGKILL)
            killed.append(victim)

    done = _run(d, tasks, timeout=120, on_pump=kill_one)
    assert killed and len(done) == 40 and all(t.done for t in done)
    assert sum(lk.dead for lk in links) == 1
    d.close()
    for p in procs:
        p.terminate()
        p.wait(10)


def _one_process_worker(tmp_path):
    """A real `gpen-stream worker` process and a dispatcher that has heard from it."""
    endpoint = f"ipc://{tmp_path}/w.sock"
    proc = _spawn_worker(endpoint)
    link = WorkerLink(zmq.Context.instance(), endpoint, is_alive=lambda: proc.poll() is None)
    d = Dispatcher([link], job="job-1", model="identity", size=512, temporal="off", timeout_s=30)
    _wait_ready(d, [proc])
    return proc, d


def test_a_worker_process_finishes_its_crops_on_sigterm(tmp_path):
    proc, d = _one_process_worker(tmp_path)
    rng = np.random.default_rng(1)
    for f in range(3):
        task = FrameTask(f, item=None, crops=[CropTask(f, 0, 0, np.eye(2, 3), rng.integers(0, 255, (512, 512, 3), np.uint8))])
        d.submit(task)
    d.pump(0)  # crops sent
    proc.send_signal(signal.SIGTERM)
    received = []
    deadline = time.monotonic() + 30
    while len(received) < 3 and time.monotonic() < deadline:
        received += d.pump(50)
    assert len(received) == 3
    assert proc.wait(30) == 0
    d.close()


def test_no_worker_left_is_an_error(tmp_path):
    proc, d = _one_process_worker(tmp_path)
    proc.kill()
    proc.wait()
    with pytest.raises(DispatchError, match="no worker left"):
        _run(d, [FrameTask(0, None, crops=[CropTask(0, 0, 0, np.eye(2, 3), np.zeros((512, 512, 3), np.uint8))])])
    d.close()


def test_the_end_of_a_track_reaches_the_worker_after_the_tracks_last_crop():
    order = []

    class Spy(Worker):
        def _handle(self, peer, header, pixels):
            order.append((header.kind, getattr(header, "track", None), getattr(header, "frame", None)))
            super()._handle(peer, header, pixels)

    worker = Spy({"identity": RecordingRestorer()}, batch=1, batch_wait_ms=1, credits=1,
                 blender=TemporalBlender(0.85, 0.03), context=zmq.Context.instance())
    endpoint = worker.bind(f"inproc://test-{uuid.uuid4().hex}")
    thread = threading.Thread(target=worker.serve, daemon=True)
    thread.start()
    d = _dispatcher([endpoint])
    tasks = _frames(3, tracks=[7]) + [FrameTask(3, None, ended_tracks=[7])]  # gone on frame 3
    _run(d, tasks)  # with one credit, crops of frames 1 and 2 are still queued when frame 3 is submitted
    deadline = time.monotonic() + 5
    while not any(k == "end_track" for k, _, _ in order) and time.monotonic() < deadline:
        time.sleep(0.01)  # the worker thread handles it just after the last result went out
    seen = [(k, t, f) for k, t, f in order if k in ("crop", "end_track")]
    assert [k for k, _, _ in seen] == ["crop", "crop", "crop", "end_track"]
    d.close()
    worker.stop_event.set()
    thread.join(5)


def test_a_decoder_cannot_send_more_crops_than_it_was_granted():
    worker, thread, endpoint = _start_thread_worker(RecordingRestorer(), batch=1, batch_wait_ms=500, credits=2)
    dealer = zmq.Context.instance().socket(zmq.DEALER)
    dealer.connect(endpoint)
    dealer.send_multipart(wire.encode(wire.Hello(job="j")))
    crop = np.zeros((SIZE, SIZE, 3), np.uint8)
    for frame in range(3):  # ignores the 2 credits it was given
        header = wire.Crop(job="j", frame=frame, track=0, face=0, model="identity", size=SIZE, shape=(SIZE, SIZE, 3),
                           affine=((1, 0, 0), (0, 1, 0)), temporal="off")
        dealer.send_multipart(wire.encode(header, crop))
    replies = []
    while len(replies) < 4 and dealer.poll(5000):
        header, _ = wire.decode(dealer.recv_multipart())
        if header.kind in ("result", "error"):
            replies.append(header)
        elif header.credits:
            replies.append(header)
    errors = [r for r in replies if r.kind == "error"]
    assert len(errors) == 1 and "credits" in errors[0].reason and errors[0].frame == 2
    dealer.close()
    worker.stop_event.set()
    thread.join(5)


def test_restore_can_use_a_worker_started_on_its_own(tmp_path, settings, worker_settings, engine_settings):
    from streamer.jobs.restore import restore_file
    from tests.support.clips import make_clip, read_frames

    endpoint = f"ipc://{tmp_path}/remote.sock"
    proc = _spawn_worker(endpoint)
    try:
        clip = make_clip(tmp_path / "in.mp4", frames=4)
        result = restore_file(clip.path, tmp_path / "out.mp4", settings(model="identity"), worker_settings(),
                              engine_settings=engine_settings(connect=[endpoint]), faces_file=clip.faces_path)
        assert result.faces == 4 and len(read_frames(tmp_path / "out.mp4")[0]) == 4
        assert proc.poll() is None  # the worker serves on after the job
    finally:
        proc.terminate()
        proc.wait(10)


def _crop_header(frame, track=0, temporal="off"):
    return wire.Crop(job="j", frame=frame, track=track, face=0, model="identity", size=SIZE, shape=(SIZE, SIZE, 3),
                     affine=((1, 0, 0), (0, 1, 0)), temporal=temporal)


def _replies(dealer, kinds=("result", "error"), n=1, timeout_ms=5000):
    out = []
    while len(out) < n and dealer.poll(timeout_ms):
        header, _ = wire.decode(dealer.recv_multipart())
        if header.kind in kinds:
            out.append(header)
    return out


def test_a_worker_restores_nothing_for_a_decoder_that_never_said_hello():
    restorer = RecordingRestorer()
    worker, thread, endpoint = _start_thread_worker(restorer, batch=1, batch_wait_ms=1)
    dealer = zmq.Context.instance().socket(zmq.DEALER)
    dealer.connect(endpoint)
    dealer.send_multipart(wire.encode(_crop_header(0), np.zeros((SIZE, SIZE, 3), np.uint8)))
    [reply] = _replies(dealer, kinds=("result", "error", "forgot"))
    assert reply.kind == "forgot"  # greet it first
    assert restorer.batches == []
    dealer.close()
    worker.stop_event.set()
    thread.join(5)


def test_a_worker_forgets_a_decoder_that_went_silent_with_its_temporal_state():
    worker, thread, endpoint = _start_thread_worker(RecordingRestorer(), batch=1, batch_wait_ms=1, credits=8,
                                                    peer_timeout_s=1.5)
    dealer = zmq.Context.instance().socket(zmq.DEALER)
    dealer.connect(endpoint)
    dealer.send_multipart(wire.encode(wire.Hello(job="j")))
    for track in range(5):  # five tracks with temporal state, then silence: no end_track, no bye
        dealer.send_multipart(wire.encode(_crop_header(0, track, "full"), np.full((SIZE, SIZE, 3), 9, np.uint8)))
    assert len(_replies(dealer, n=5)) == 5 and len(worker.blender) == 5
    expired = metrics.PEERS_EXPIRED._value.get()
    deadline = time.monotonic() + 10
    while len(worker.blender) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(worker.blender) == 0 and metrics.PEERS_EXPIRED._value.get() == expired + 1
    dealer.send_multipart(wire.encode(_crop_header(1), np.zeros((SIZE, SIZE, 3), np.uint8)))
    assert _replies(dealer, kinds=("result", "error", "forgot"))[0].kind == "forgot"  # it must greet the worker again
    dealer.close()
    worker.stop_event.set()
    thread.join(5)


def test_a_decoder_greets_a_restarted_worker_again_and_its_crops_go_through(tmp_path):
    proc, d = _one_process_worker(tmp_path)
    rng = np.random.default_rng(2)
    tasks = [FrameTask(f, None, crops=[CropTask(f, 0, 0, np.eye(2, 3), rng.integers(0, 255, (512, 512, 3), np.uint8))])
             for f in range(6)]
    _run(d, tasks[:2])
    proc.kill()  # a new worker at the same endpoint knows nothing of this decoder
    proc.wait()
    d.links[0]._is_alive = lambda: True  # as with --connect: the decoder cannot see the process
    proc = _spawn_worker(f"ipc://{tmp_path}/w.sock")
    try:
        done = _run(d, tasks[2:], timeout=60)
        assert len(done) == 4 and all(t.restored for t in done)
    finally:
        d.close()
        proc.terminate()
        proc.wait(10)


def test_connecting_to_an_endpoint_where_nothing_listens_fails_fast(tmp_path):
    link = WorkerLink(zmq.Context.instance(), f"ipc://{tmp_path}/nobody.sock", start_timeout_s=1.0)
    d = Dispatcher([link], job="j", model="identity", size=SIZE, temporal="off", timeout_s=30)
    started = time.monotonic()
    with pytest.raises(DispatchError, match="did not answer within 1 s; is a gpen-stream worker running there"):
        d.wait_ready(300)
    assert time.monotonic() - started < 5
    d.close()


class SlowRestorer(IdentityRestorer):
    def __init__(self, seconds: float):
        super().__init__("identity", SIZE)
        self.seconds = seconds

    def restore(self, crops):
        time.sleep(self.seconds)
        return crops


def test_a_crop_that_cannot_make_its_deadline_is_answered_at_once_while_the_model_is_busy():
    """A live frame whose face cannot be restored in time goes out as soon as the worker knows,
    not when its deadline passes (nor when the model is free again)."""
    from streamer.dispatch import live_policy

    worker, thread, endpoint = _start_thread_worker(SlowRestorer(1.0), batch=1, batch_wait_ms=1)
    busy = _dispatcher([endpoint])  # no deadlines: keeps the model busy
    links = [WorkerLink(zmq.Context.instance(), endpoint)]
    live = Dispatcher(links, job="live-1", model="identity", size=SIZE, temporal="off", timeout_s=30,
                      policy=live_policy(0.5, 1.0))
    try:
        live.wait_ready(30)
        _run(busy, _frames(1))  # the worker learns that a batch takes 1 s
        busy.submit(_frames(1, start=1)[0])
        assert busy.pump(0) == []  # sent: the model is busy for the next second
        time.sleep(0.1)
        started = time.monotonic()
        done = _run(live, _frames(1, start=2))
        took = time.monotonic() - started
        assert took < 0.3, took  # the worker's answer, not the 0.5 s deadline nor the model's 0.9 s left
        assert not done[0].restored and live.passed_faces == 1
        while not busy.pump(20):  # the busy crop comes back restored
            assert time.monotonic() - started < 5
    finally:
        live.close()
        busy.close()
        worker.stop_event.set()
        thread.join(10)


def test_a_stale_run_time_estimate_wears_off_so_deadline_crops_are_tried_again():
    worker = Worker({"identity": IdentityRestorer("identity", SIZE)}, batch=1, batch_wait_ms=1,
                    blender=TemporalBlender(0.85, 0.03))
    try:
        worker._model_s["identity"] = 10.0  # one very slow batch (a warm-up)
        worker._model_ran["identity"] = time.monotonic()
        assert worker._estimate("identity") == pytest.approx(10.0, rel=0.01)
        worker._model_ran["identity"] -= 5 * 6  # six half-lives without a run
        assert worker._estimate("identity") < 10.0 / 60
    finally:
        worker.stop_event.set()
        worker.serve()


class BlockingRestorer(RecordingRestorer):
    """Holds its first batch until ``release`` is set, so crops stay in the worker."""

    def __init__(self):
        super().__init__()
        self.release = threading.Event()

    def restore(self, crops):
        self.release.wait(30)
        return super().restore(crops)


def _sent_crops(d):
    """Record (worker endpoint, frame, track, reset) for every crop the dispatcher sends."""
    sent = []
    for link in d.links:
        original = link.send

        def send(header, pixels=None, link=link, original=original):
            if isinstance(header, wire.Crop):
                sent.append((link.endpoint, header.frame, header.track, header.reset))
            original(header, pixels)

        link.send = send
    return sent


def test_a_decoder_the_worker_forgot_gets_its_held_crops_restored_and_one_window_of_credits():
    """The worker forgets a silent decoder while it holds its crops (one in the model, the rest
    queued): at the decoder's next ping it hears so, re-sends every unanswered crop once, and
    never holds more credits than the window."""
    restorer = BlockingRestorer()
    worker, thread, endpoint = _start_thread_worker(restorer, batch=1, batch_wait_ms=1, credits=4,
                                                    peer_timeout_s=1.0)
    d = _dispatcher([endpoint])
    link = d.links[0]
    tasks = _frames(6)
    for t in tasks:
        d.submit(t)
    d.pump(0)  # four crops sent: one goes into the model (held there), three wait
    assert len(link.outstanding) == 4
    deadline = time.monotonic() + 10
    while worker._peers and time.monotonic() < deadline:  # the decoder is silent: no pump, no ping
        time.sleep(0.1)
    assert not worker._peers, "the worker did not forget the silent decoder"
    restorer.release.set()
    sent = _sent_crops(d)
    peak, done = [], []
    deadline = time.monotonic() + 20
    while len(done) < 6:
        done += d.pump(20)
        peak.append(link.credits + len(link.outstanding))
        assert time.monotonic() < deadline, f"stalled with {sorted(link.outstanding)} outstanding"
    assert max(peak) <= 4
    assert [frame for _, frame, _, _ in sent] == [0, 1, 2, 3, 4, 5]  # the lost four again, in order, then the rest
    assert [reset for *_, reset in sent] == [True] + [False] * 5  # the track's state starts afresh once
    for task in done:
        assert np.array_equal(task.restored[0], task.crops[0].crop[::-1])
    d.close()
    worker.stop_event.set()
    thread.join(5)


def test_a_worker_restarted_at_the_same_address_gets_the_crops_the_old_one_lost(tmp_path):
    """The old process took the crops and died without answering; the new one at the same
    address says it does not know the decoder at its first ping, and gets them again."""
    endpoint = f"ipc://{tmp_path}/w.sock"
    context = zmq.Context.instance()
    old = context.socket(zmq.ROUTER)  # a worker that grants credits, takes crops and never answers
    old.bind(endpoint)
    d = Dispatcher([WorkerLink(context, endpoint)], job="job-r", model="identity", size=SIZE, temporal="off",
                   timeout_s=60)
    d._greet(d.links[0])
    peer, _ = old.recv_multipart()
    old.send_multipart([peer, *wire.encode(wire.Credit(worker="old", credits=4, models=("identity",)))])
    d.wait_ready(10)
    tasks = _frames(4)
    for t in tasks:
        d.submit(t)
    d.pump(100)
    assert len(d.links[0].outstanding) == 4
    old.close(linger=0)
    worker, thread, _ = _start_thread_worker(RecordingRestorer(), endpoint, batch=4, batch_wait_ms=5)
    started, done = time.monotonic(), []
    while len(done) < 4:
        done += d.pump(20)
        assert time.monotonic() - started < 15, "the lost crops were never sent again"
    assert all(np.array_equal(t.restored[0], t.crops[0].crop[::-1]) for t in done)
    d.close()
    worker.stop_event.set()
    thread.join(5)


def test_a_worker_that_vanished_never_blocks_the_dispatcher_and_is_declared_dead(tmp_path):
    """No crops out, no answers: pings must not fill the socket until a send blocks, and a
    worker silent for the timeout is gone even with nothing outstanding."""
    endpoint = f"ipc://{tmp_path}/gone.sock"
    context = zmq.Context.instance()
    router = context.socket(zmq.ROUTER)
    router.bind(endpoint)
    link = WorkerLink(context, endpoint)
    link.socket.setsockopt(zmq.SNDHWM, 5)
    d = Dispatcher([link], job="job-v", model="identity", size=SIZE, temporal="off", timeout_s=1.5)
    d._greet(link)
    peer, _ = router.recv_multipart()
    router.send_multipart([peer, *wire.encode(wire.Credit(worker="w", credits=4, models=("identity",)))])
    d.wait_ready(10)
    router.close(linger=0)
    started = time.monotonic()
    for _ in range(50):  # far more pings than the socket holds
        link.last_ping = 0.0
        d._ping()
    assert time.monotonic() - started < 5
    while not link.dead:
        d.pump(50)
        assert time.monotonic() - started < 10, "a silent worker was never declared dead"
    assert "silent" in link.reason
    d.close()


def test_a_stopping_worker_takes_nothing_new_finishes_what_it_holds_and_exits_while_the_job_goes_on():
    """A stop (SIGTERM) while a decoder keeps it busy: the worker leaves the registry, says it
    is leaving, and exits within moments; its crops come back or go elsewhere, none is lost."""
    first = _start_thread_worker(RecordingRestorer(), batch=2, batch_wait_ms=5, credits=4)
    second = _start_thread_worker(RecordingRestorer(), batch=2, batch_wait_ms=5, credits=4)
    withdrawn = []
    first[0].on_stopping.append(lambda: withdrawn.append(time.monotonic()))
    d = _dispatcher([first[2], second[2]])
    sent = _sent_crops(d)
    tasks, done, stopped, exited = [], [], None, None
    started = time.monotonic()
    while exited is None or len(done) < len(tasks):  # frames keep coming until the stopped worker is gone
        if exited is None and len(tasks) - len(done) < 8:
            for task in _frames(4, faces_per_frame=2, start=len(tasks)):
                tasks.append(task)
                d.submit(task)
        done += d.pump(5)
        if stopped is None and len(done) > 20:
            first[0].stop_event.set()
            stopped = (time.monotonic(), len(sent))
        if stopped is not None and exited is None and not first[1].is_alive():
            exited = time.monotonic()
        assert time.monotonic() - started < 60, "the stopped worker kept draining while the decoder was busy"
    assert all(len(t.restored) == 2 for t in done) and len(done) == len(tasks)
    assert first[0].error is None and exited - stopped[0] < 5
    assert withdrawn and withdrawn[0] - stopped[0] < 2
    assert d.links[0].leaving or d.links[0].dead
    after = [s for s in sent[stopped[1]:] if s[0] == first[2]]
    assert len(after) <= 4  # only what was sent before the decoder heard: at most its credits
    d.close()
    second[0].stop_event.set()
    second[1].join(5)


def test_crops_a_slow_decoder_sent_before_it_heard_the_worker_leave_are_still_restored():
    """The worker waits for each decoder to answer its "leaving" (or DRAIN_HEARD_S): a decoder
    that reads it late may have sent crops meanwhile, and they must not be lost."""
    worker, thread, endpoint = _start_thread_worker(RecordingRestorer(), batch=2, batch_wait_ms=5, credits=4)
    d = _dispatcher([endpoint])
    worker.stop_event.set()
    time.sleep(1.0)  # the worker said it is leaving; this decoder has not read it yet
    tasks = _frames(4)
    for t in tasks:
        d.submit(t)
    d._send_queued()  # four crops out, as a decoder does before its next read
    assert len(d.links[0].outstanding) == 4
    time.sleep(1.0)
    done, deadline = [], time.monotonic() + 10
    while len(done) < 4:
        done += d.pump(20)
        assert time.monotonic() < deadline, "crops sent before the decoder heard were lost"
    assert all(np.array_equal(t.restored[0], t.crops[0].crop[::-1]) for t in done)
    assert d.links[0].leaving
    thread.join(10)
    assert not thread.is_alive()  # and it exits once the decoder answered
    d.close()
