"""The GPU farm on CPU: workers registered in a real Redis, memory leases, out-of-memory
back-off, jobs sharing workers, CURVE keys. Real worker processes and sockets throughout."""

import os
import signal
import subprocess
import sys
import threading
import time
import uuid

import numpy as np
import pytest
import torch
import zmq

from configs.keys import Keys
from streamer.dispatch import CropTask, DispatchError, Dispatcher, FrameTask, WorkerLink
from streamer.engine import Engine
from streamer.jobs.restore import restore_file
from tests.support.clips import make_clip, read_frames
from tests.support.redis_server import free_port, unique_prefix
from workers import metrics
from workers.budget import leases
from workers.registry import registered_workers, wait_for_workers
from workers.restorers import IdentityRestorer
from workers.temporal import TemporalBlender
from workers.worker import Worker

CLI = [sys.executable, "-m", "streamer"]


def _worker(server, prefix, tmp_path, *extra, model="identity", name=None, env=None):
    name = name or uuid.uuid4().hex[:6]
    log = open(tmp_path / f"worker-{name}.log", "ab")
    environment = {**os.environ, "GPEN_STREAM_WORKER_REGISTRY_TTL_S": "2", "GPEN_STREAM_WORKER_BATCH_WAIT_MS": "5",
                   **(env or {})}
    proc = subprocess.Popen([*CLI, "worker", "--endpoint", f"tcp://127.0.0.1:{free_port()}", "--redis", server.url,
                             "--prefix", prefix, "--model", model, *extra],
                            stdout=log, stderr=subprocess.STDOUT, env=environment)
    proc.log_path = tmp_path / f"worker-{name}.log"
    return proc


def _stop(*procs):
    for p in procs:
        if p.poll() is None:
            p.terminate()
    for p in procs:
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            p.kill()


def test_restore_uses_registered_workers_and_survives_one_being_killed(redis_server, tmp_path, settings,
                                                                       worker_settings, engine_settings):
    prefix = unique_prefix()
    workers = [_worker(redis_server, prefix, tmp_path, name=f"w{i}") for i in range(2)]
    r = redis_server.client()
    try:
        deadline = time.monotonic() + 60
        while len(registered_workers(r, Keys(prefix))) < 2:
            assert time.monotonic() < deadline and all(w.poll() is None for w in workers)
            time.sleep(0.1)
        clip = make_clip(tmp_path / "in.mp4", frames=160, audio=False)
        engine = Engine(engine_settings(redis=redis_server.url), worker_settings(), prefix=prefix)
        killed = []

        def progress(p):
            if p.frames_done >= 40 and not killed:
                # the worker the face's track is on (a track stays with one worker): the one that restored most
                busiest = max(registered_workers(r, Keys(prefix)), key=lambda w: int(w.get("restored", 0)))
                victim = next(w for w in workers if str(w.pid) == busiest["pid"])
                victim.send_signal(signal.SIGKILL)
                killed.append(victim)

        failovers = metrics.WORKER_FAILOVERS._value.get()
        result = restore_file(clip.path, tmp_path / "out.mp4", settings(model="identity", temporal="full"),
                              engine=engine, faces_file=clip.faces_path, progress=progress)
        engine.close()
        assert killed and result.frames == 160 and result.faces == 160
        assert len(read_frames(tmp_path / "out.mp4")[0]) == 160
        assert metrics.WORKER_FAILOVERS._value.get() >= failovers + 1  # its crops went to the other worker
        deadline = time.monotonic() + 10
        while len(registered_workers(r, Keys(prefix))) != 1:  # the dead worker's key expired
            assert time.monotonic() < deadline
            time.sleep(0.2)
    finally:
        _stop(*workers)


def test_both_registered_workers_share_a_job(redis_server, tmp_path, settings, worker_settings, engine_settings):
    prefix = unique_prefix()
    workers = [_worker(redis_server, prefix, tmp_path, name=f"s{i}") for i in range(2)]
    r = redis_server.client()
    try:
        while len(registered_workers(r, Keys(prefix))) < 2:
            time.sleep(0.1)
        clip = make_clip(tmp_path / "two.mp4", frames=12, audio=False)
        faces = tmp_path / "two-faces.jsonl"  # two faces per frame: two tracks, one per worker
        lines = clip.faces_path.read_text().splitlines()
        import json

        doubled = []
        for line in lines:
            record = json.loads(line)
            shifted = [{"landmarks": (np.array(f["landmarks"]) * 0.5).tolist()} for f in record["faces"]]
            doubled.append(json.dumps({"frame": record["frame"], "faces": record["faces"] + shifted}))
        faces.write_text("\n".join(doubled) + "\n")
        with Engine(engine_settings(redis=redis_server.url), worker_settings(), prefix=prefix) as engine:
            result = restore_file(clip.path, tmp_path / "out.mp4", settings(model="identity", min_face=0),
                                  engine=engine, faces_file=faces)
        assert result.faces == 24
        time.sleep(1.5)  # a heartbeat later, the registrations show what each restored
        served = [int(w["restored"]) for w in registered_workers(r, Keys(prefix))]
        assert len(served) == 2 and all(n > 0 for n in served) and sum(served) == 24, served
    finally:
        _stop(*workers)
    logs = [w.log_path.read_text() for w in workers]
    assert all("registered as" in text for text in logs)


def test_a_budget_that_holds_one_model_makes_the_second_worker_wait(redis_server, tmp_path, gpen256_weights):
    prefix = unique_prefix()
    env = {"GPEN_STREAM_WORKER_MODELS": f'{{"GPEN-BFR-256": "{gpen256_weights}"}}', "GPEN_STREAM_WORKER_BATCH": "1",
           "GPEN_STREAM_WORKER_THREADS": "1"}
    r = redis_server.client()
    first = _worker(redis_server, prefix, tmp_path, model="GPEN-BFR-256", name="first", env=env)
    second = None
    try:
        found = wait_for_workers(r, Keys(prefix), "GPEN-BFR-256", 120)
        assert found, first.log_path.read_text()
        [budget_key] = [k.decode() for k in r.keys(f"{prefix}:gpu:*")]
        held = sum(leases(r, budget_key).values())
        budget = int(held * 1.5)  # room for this worker, not for a second one like it
        # the second worker says the device is that small: the smallest total of the live holders applies
        second = _worker(redis_server, prefix, tmp_path, model="GPEN-BFR-256", name="second",
                         env={**env, "GPEN_STREAM_WORKER_MEMORY_BUDGET_MIB": str(budget)})
        deadline = time.monotonic() + 30
        while "waiting for" not in second.log_path.read_text():
            assert time.monotonic() < deadline, second.log_path.read_text()
            assert sum(leases(r, budget_key).values()) <= budget
            time.sleep(0.2)
        for _ in range(10):
            assert sum(leases(r, budget_key).values()) <= budget
            assert len(registered_workers(r, Keys(prefix))) == 1  # the second does not serve without memory
            time.sleep(0.2)
        first.send_signal(signal.SIGKILL)  # its lease expires; the waiting worker gets the memory
        assert wait_for_workers(r, Keys(prefix), "GPEN-BFR-256", 60) and second.poll() is None
        deadline = time.monotonic() + 30
        while len(leases(r, budget_key)) != 1:
            assert time.monotonic() < deadline
            time.sleep(0.2)
        assert sum(leases(r, budget_key).values()) <= budget
    finally:
        _stop(first, *([second] if second else []))


class _ShortOfMemory(IdentityRestorer):
    """Identity, but a batch of more than ``limit`` crops raises CUDA's out-of-memory error."""

    def __init__(self, limit):
        super().__init__("identity", 16)
        self.limit, self.batches = limit, []

    def restore(self, crops):
        self.batches.append(len(crops))
        if len(crops) > self.limit:
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return crops[:, ::-1].copy()


def test_an_out_of_memory_error_halves_the_batch_and_loses_no_crop():
    restorer = _ShortOfMemory(limit=2)
    worker = Worker({"identity": restorer}, batch=8, batch_wait_ms=200, credits=16,
                    blender=TemporalBlender(0.85, 0.03), context=zmq.Context.instance())
    endpoint = worker.bind(f"inproc://oom-{uuid.uuid4().hex}")
    thread = threading.Thread(target=worker.serve, daemon=True)
    thread.start()
    d = Dispatcher([WorkerLink(zmq.Context.instance(), endpoint)], job="oom", model="identity", size=16,
                   temporal="off", timeout_s=30)
    d.wait_ready(10)
    rng = np.random.default_rng(0)
    tasks = [FrameTask(f, None, crops=[CropTask(f, 0, f, np.eye(2, 3), rng.integers(0, 255, (16, 16, 3), np.uint8))])
             for f in range(16)]
    oom = metrics.OOM_RETRIES.labels(model="identity")._value.get()
    for t in tasks:
        d.submit(t)
    done, deadline = [], time.monotonic() + 30
    while len(done) < 16:
        done += d.pump(20)
        assert time.monotonic() < deadline
    assert all(np.array_equal(t.restored[0], t.crops[0].crop[::-1]) for t in done)  # as without the error
    assert max(restorer.batches) > 2 and restorer.max_batch == 2 and restorer.batches[-1] <= 2
    assert metrics.OOM_RETRIES.labels(model="identity")._value.get() > oom
    d.close()
    worker.stop_event.set()
    thread.join(5)


def test_two_jobs_sharing_one_worker_both_progress(tmp_path, settings, worker_settings, engine_settings):
    long_clip = make_clip(tmp_path / "long.mp4", frames=120, audio=False)
    short_clip = make_clip(tmp_path / "short.mp4", frames=20, audio=False, seed=3)
    seen: dict[str, list] = {"long": [], "short": []}
    with Engine(engine_settings(), worker_settings()) as engine:
        def job(name, clip):
            restore_file(clip.path, tmp_path / f"{name}-out.mp4", settings(model="identity"), engine=engine,
                         faces_file=clip.faces_path, progress=lambda p: seen[name].append((time.monotonic(), p.frames_done)))

        first = threading.Thread(target=job, args=("long", long_clip))
        first.start()
        deadline = time.monotonic() + 60
        while not seen["long"] or seen["long"][-1][1] < 10:
            assert first.is_alive() and time.monotonic() < deadline
            time.sleep(0.02)
        job("short", short_clip)
        first.join(120)
    long_done = next(t for t, n in seen["long"] if n >= 120)
    short_done = next(t for t, n in seen["short"] if n >= 20)
    assert short_done < long_done  # the short job did not queue behind the long one
    assert len(read_frames(tmp_path / "short-out.mp4")[0]) == 20
    assert len(read_frames(tmp_path / "long-out.mp4")[0]) == 120


def test_a_keyed_worker_serves_only_decoders_that_hold_the_key(tmp_path):
    keys = tmp_path / "keys"
    subprocess.run([*CLI, "keys", str(keys)], check=True, capture_output=True)
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    proc = subprocess.Popen([*CLI, "worker", "--endpoint", endpoint, "--model", "identity", "--keys", str(keys)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        from workers.security import ClientKeys

        crop = np.zeros((512, 512, 3), np.uint8)
        stranger = Dispatcher([WorkerLink(zmq.Context.instance(), endpoint, start_timeout_s=3)], job="x",
                              model="identity", size=512, temporal="off", timeout_s=30)
        with pytest.raises(DispatchError, match="did not answer"):
            stranger.wait_ready(30)
        stranger.close()
        keyed = Dispatcher([WorkerLink(zmq.Context.instance(), endpoint, start_timeout_s=30,
                                       socket_options=ClientKeys(keys).apply)],
                           job="y", model="identity", size=512, temporal="off", timeout_s=30)
        keyed.wait_ready(60)
        keyed.submit(FrameTask(0, None, crops=[CropTask(0, 0, 0, np.eye(2, 3), crop)]))
        done, deadline = [], time.monotonic() + 30
        while not done:
            done = keyed.pump(50)
            assert time.monotonic() < deadline
        assert done[0].restored
        keyed.close()
    finally:
        proc.terminate()
        proc.wait(30)


def test_a_worker_refuses_an_open_network_without_keys():
    result = subprocess.run([*CLI, "worker", "--endpoint", "tcp://0.0.0.0:0", "--model", "identity"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "refusing to serve" in result.stderr and "--insecure" in result.stderr


def test_a_job_waits_queued_until_a_worker_serves_its_model(redis_server, tmp_path):
    import json

    from tests.test_serve import Daemon, _wait_state

    (tmp_path / "in").mkdir()
    (tmp_path / "out").mkdir()
    clip = make_clip(tmp_path / "in" / "q.mp4", frames=4, width=96, height=72, face_px=30, audio=False)
    prefix = unique_prefix()
    daemon = Daemon(redis_server, prefix, tmp_path, extra=["--farm"])
    r = redis_server.client()
    worker = None
    try:
        r.xadd(f"{prefix}:jobs", {"id": "q", "input": str(clip.path), "output": str(tmp_path / "out" / "q.mp4"),
                                  "model": "identity", "options": json.dumps({"faces": str(clip.faces_path)})})
        deadline = time.monotonic() + 30
        while b"no registered worker serves identity" not in (r.hget(f"{prefix}:job:q", "error") or b""):
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert r.hget(f"{prefix}:job:q", "state") == b"queued"
        worker = _worker(redis_server, prefix, tmp_path)
        job = _wait_state(r, prefix, "q", {"done", "failed"}, timeout=60)
        assert job["state"] == "done", job
    finally:
        assert daemon.stop() == 0
        if worker is not None:
            _stop(worker)


def test_a_redis_that_stops_answering_never_holds_the_dispatch_thread():
    """The worker list is read on its own thread: asking for it returns the last list at once,
    even while a read hangs on a server that accepts connections and never answers."""
    import socket as socket_lib

    import redis as redis_lib
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    from configs.keys import Keys
    from streamer.discovery import REFRESH_S, RedisDirectory

    silent = socket_lib.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    client = redis_lib.Redis(host="127.0.0.1", port=silent.getsockname()[1], socket_timeout=1,
                             retry=Retry(NoBackoff(), 0))
    directory = RedisDirectory(client, Keys("gpen-test"), start_timeout_s=5).for_model("identity")
    assert directory.endpoints() == []  # the first answer is waited for (and times out)
    time.sleep(REFRESH_S * 1.5)
    for _ in range(5):  # reads hang behind these calls; the calls do not
        asked = time.monotonic()
        assert directory.endpoints() == []
        assert time.monotonic() - asked < 0.2
        time.sleep(REFRESH_S)
    client.close()
    silent.close()


def test_a_job_waiting_for_a_worker_is_cancelled_at_once_and_an_unknown_model_is_refused(redis_server, tmp_path):
    import json

    from tests.test_serve import Daemon, _wait_state

    (tmp_path / "in").mkdir()
    (tmp_path / "out").mkdir()
    clip = make_clip(tmp_path / "in" / "q.mp4", frames=4, width=96, height=72, face_px=30, audio=False)
    prefix = unique_prefix()
    # no worker at all; a long claim_idle_s: taking the entry over again is not how the cancel is seen
    daemon = Daemon(redis_server, prefix, tmp_path, extra=["--farm"], env={"GPEN_STREAM_SERVE_CLAIM_IDLE_S": "30"})
    r = redis_server.client()
    try:
        for job_id, model in (("w", "identity"), ("typo", "GPEN-BFR-5l2")):
            r.xadd(f"{prefix}:jobs", {"id": job_id, "input": str(clip.path), "output": str(tmp_path / "out" / "q.mp4"),
                                      "model": model, "options": json.dumps({"faces": str(clip.faces_path)})})
        typo = _wait_state(r, prefix, "typo", {"done", "failed"}, timeout=30)
        deadline = time.monotonic() + 30
        while b"no registered worker serves identity" not in (r.hget(f"{prefix}:job:w", "error") or b""):
            assert time.monotonic() < deadline
            time.sleep(0.1)
        asked = time.monotonic()
        r.hset(f"{prefix}:job:w", "cancel", "1")
        waiting = _wait_state(r, prefix, "w", {"cancelled", "done", "failed"}, timeout=10)
        took = time.monotonic() - asked
    finally:
        assert daemon.stop() == 0
    assert typo["state"] == "failed" and "unknown model 'GPEN-BFR-5l2'" in typo["error"], typo
    assert waiting["state"] == "cancelled" and took < 1.5, (waiting, took)
    assert r.xpending(f"{prefix}:jobs", prefix)["pending"] == 0


def test_a_gpu_budget_is_the_smallest_total_its_live_holders_report(redis_server):
    from workers.budget import GpuBudget

    r = redis_server.client()
    key = f"{unique_prefix()}:gpu:host:0"
    old = GpuBudget(r, key, "a", total_mib=1000)
    assert old.acquire(800)
    old.release()
    raised = GpuBudget(r, key, "b", total_mib=4000)  # the operator raised worker.memory_budget_mib
    assert raised.acquire(2000)
    lowered = GpuBudget(r, key, "c", total_mib=2500)  # another worker, told the device is smaller
    assert not lowered.acquire(1000) and lowered.acquire(500)
    assert not raised.acquire(2500)  # while c lives, its smaller figure holds for everyone
    lowered.release()
    assert raised.acquire(3500)
    raised.release()


def test_a_lapsed_lease_another_worker_took_is_given_up_and_reported(redis_server):
    from workers.budget import GpuBudget

    r = redis_server.client()
    key = f"{unique_prefix()}:gpu:host:0"
    a = GpuBudget(r, key, "a", total_mib=1000, ttl_s=1.0)
    b = GpuBudget(r, key, "b", total_mib=1000, ttl_s=1.0)
    told = []
    a.on_lost = told.append
    assert a.acquire(800)
    a._stop.set()  # a's renewals stop (its Redis out of reach) for longer than the lease's TTL
    time.sleep(1.5)
    try:
        assert b.acquire(800)
        assert not a.renew()  # what a's renewing thread does when Redis is back
        assert a.mib == 0 and a.lost.is_set() and told == [800]
        assert leases(r, key) == {"b": 800}
        b.release()
        assert a.renew() and a.mib == 800 and not a.lost.is_set()  # it has it back once there is room
    finally:
        a.release()
        b.release()
