"""``gpen-stream serve`` and the Redis job protocol: a real redis-server started by the test,
real daemon processes, the identity model, jobs submitted with plain redis-py commands."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis

from tests.support.clips import make_clip, read_frames
from tests.support.redis_server import unique_prefix

CLI = [sys.executable, "-m", "streamer"]


class Daemon:
    """A `gpen-stream serve` process with the identity model, its log in a file."""

    def __init__(self, server, prefix: str, roots: Path, *, name: str = "d", extra=(), env=None):
        self.log = roots / f"{name}.log"
        cmd = [*CLI, "serve", "--redis", server.url, "--prefix", prefix, "--input-root", str(roots / "in"),
               "--output-root", str(roots / "out"), "--model", "identity", "--http-port", "0", *extra]
        environment = {**os.environ, "GPEN_STREAM_SERVE_CLAIM_IDLE_S": "2", **(env or {})}
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=environment)
        self.client = server.client()
        self.prefix = prefix
        deadline = time.monotonic() + 60
        while not self.client.keys(f"{prefix}:daemon:*") or not self._mine_listed():
            assert self.proc.poll() is None and time.monotonic() < deadline, self.text()
            time.sleep(0.1)

    def _mine_listed(self) -> bool:
        return any(str(self.proc.pid) in k.decode() for k in self.client.keys(f"{self.prefix}:daemon:*"))

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self, sig=signal.SIGTERM, timeout=60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout)


@pytest.fixture
def roots(tmp_path):
    for name in ("in", "out"):
        (tmp_path / name).mkdir()
    return tmp_path


def _job(r, prefix, job_id):
    return {k.decode(): v.decode() for k, v in r.hgetall(f"{prefix}:job:{job_id}").items()}


def _wait_state(r, prefix, job_id, states, timeout=90):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = _job(r, prefix, job_id)
        if job.get("state") in states:
            return job
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} never reached {states}: {_job(r, prefix, job_id)}")


def _wait_progress(r, prefix, job_id, fraction, daemon, timeout=60):
    deadline = time.monotonic() + timeout
    while float(_job(r, prefix, job_id).get("progress") or 0) < fraction:
        assert time.monotonic() < deadline, daemon.text()
        time.sleep(0.05)


def _events(r, prefix, job_id):
    return [{k.decode(): v.decode() for k, v in fields.items()} for _, fields in r.xrange(f"{prefix}:events")
            if fields.get(b"id") == job_id.encode()]


def _leftovers(folder: Path):
    return [p.name for p in folder.iterdir() if ".part" in p.name]


def test_a_job_submitted_with_plain_xadd_is_done_like_restore_does_it(redis_server, roots):
    clip = make_clip(roots / "in" / "a.mp4", frames=20)
    prefix = unique_prefix()
    daemon = Daemon(redis_server, prefix, roots)
    r = redis_server.client()
    try:
        r.xadd(f"{prefix}:jobs", {"id": "job-1", "input": str(clip.path), "output": str(roots / "out" / "a.mp4"),
                                  "model": "identity",
                                  "options": json.dumps({"faces": str(clip.faces_path), "crf": 0, "preset": "ultrafast"})})
        job = _wait_state(r, prefix, "job-1", {"done", "failed"})
    finally:
        assert daemon.stop() == 0
    assert job["state"] == "done", job
    for field in ("progress", "frames_done", "frames_total", "fps", "eta_s", "error", "output", "attempts", "daemon",
                  "created", "started", "finished"):
        assert field in job, field
    assert job["output"] == str(roots / "out" / "a.mp4") and job["attempts"] == "1" and job["frames_done"] == "20"
    assert job["created"].endswith("Z") and job["finished"] >= job["started"] >= job["created"]
    assert r.ttl(f"{prefix}:job:job-1") > 0  # a finished job expires
    states = [e["state"] for e in _events(r, prefix, "job-1") if "state" in e]
    assert states[0] == "running" and states[-1] == "done"

    same = roots / "restore.mp4"
    subprocess.run([*CLI, "restore", str(clip.path), "-o", str(same), "--model", "identity", "--faces",
                    str(clip.faces_path), "--crf", "0", "--preset", "ultrafast", "-q"], check=True, capture_output=True)
    frames_d, pts_d, tb_d, _ = read_frames(roots / "out" / "a.mp4")
    frames_r, pts_r, tb_r, _ = read_frames(same)
    frames_in, pts_in, tb_in, _ = read_frames(clip.path)
    assert (pts_d, tb_d) == (pts_in, tb_in) == (pts_r, tb_r) and len(frames_d) == 20
    assert all((a == b).all() for a, b in zip(frames_d, frames_r))
    assert not _leftovers(roots / "out")
    assert r.xpending(f"{prefix}:jobs", prefix)["pending"] == 0  # acknowledged


def test_a_daemon_killed_in_the_middle_leaves_the_job_to_another(redis_server, roots):
    clip = make_clip(roots / "in" / "long.mp4", frames=150, audio=False)
    prefix = unique_prefix()
    first = Daemon(redis_server, prefix, roots, name="first")
    r = redis_server.client()
    out = roots / "out" / "long.mp4"
    r.xadd(f"{prefix}:jobs", {"id": "long", "input": str(clip.path), "output": str(out),
                              "options": json.dumps({"faces": str(clip.faces_path)})})
    _wait_progress(r, prefix, "long", 0.15, first)
    first.stop(signal.SIGKILL)
    assert _leftovers(roots / "out")  # the dead daemon's half-written file
    second = Daemon(redis_server, prefix, roots, name="second")
    try:
        job = _wait_state(r, prefix, "long", {"done", "failed"}, timeout=120)
    finally:
        assert second.stop() == 0
    assert job["state"] == "done" and job["attempts"] == "2", job
    assert len(read_frames(out)[0]) == 150
    assert sorted(p.name for p in (roots / "out").iterdir()) == ["long.mp4"]  # one output, nothing else


def test_fifty_jobs_on_two_daemons_each_run_exactly_once(redis_server, roots):
    clip = make_clip(roots / "in" / "s.mp4", frames=3, width=96, height=72, face_px=30, audio=False)
    prefix = unique_prefix()
    daemons = [Daemon(redis_server, prefix, roots, name=f"d{i}", extra=["--concurrency", "2"]) for i in range(2)]
    r = redis_server.client()
    try:
        for i in range(50):
            r.xadd(f"{prefix}:jobs", {"id": f"j{i}", "input": str(clip.path), "output": str(roots / "out" / f"{i}.mp4"),
                                      "options": json.dumps({"faces": str(clip.faces_path)})})
        r.xadd(f"{prefix}:jobs", {"id": "j7", "input": str(clip.path), "output": str(roots / "out" / "again.mp4")})
        jobs = [_wait_state(r, prefix, f"j{i}", {"done", "failed"}, timeout=240) for i in range(50)]
        time.sleep(1.5)  # let the duplicate reach a daemon
    finally:
        for d in daemons:
            assert d.stop() == 0
    assert all(j["state"] == "done" and j["attempts"] == "1" for j in jobs)
    for i in range(50):
        runs = [e for e in _events(r, prefix, f"j{i}") if e.get("state") == "running"]
        assert len(runs) == 1, (i, runs)
    assert len({j["daemon"] for j in jobs}) == 2  # both daemons took a share
    assert not (roots / "out" / "again.mp4").exists() and len(list((roots / "out").glob("*.mp4"))) == 50
    assert r.xpending(f"{prefix}:jobs", prefix)["pending"] == 0


def test_a_job_ended_without_running_removes_what_a_crashed_attempt_left(redis_server, roots):
    clip = make_clip(roots / "in" / "long.mp4", frames=150, audio=False)
    prefix = unique_prefix()
    first = Daemon(redis_server, prefix, roots, name="first", extra=["--concurrency", "2"])
    r = redis_server.client()
    for job_id in ("cancelled", "buried"):
        r.xadd(f"{prefix}:jobs", {"id": job_id, "input": str(clip.path), "output": str(roots / "out" / f"{job_id}.mp4"),
                                  "options": json.dumps({"faces": str(clip.faces_path)})})
    deadline = time.monotonic() + 60
    while min(float(_job(r, prefix, j).get("progress") or 0) for j in ("cancelled", "buried")) < 0.1:
        assert time.monotonic() < deadline, first.text()
        time.sleep(0.05)
    first.stop(signal.SIGKILL)
    assert len(_leftovers(roots / "out")) == 2  # each crashed attempt's half-written file
    r.hset(f"{prefix}:job:cancelled", "cancel", "1")  # the user gives up on it
    second = Daemon(redis_server, prefix, roots, name="second", env={"GPEN_STREAM_SERVE_MAX_ATTEMPTS": "1"})
    try:
        cancelled = _wait_state(r, prefix, "cancelled", {"cancelled", "done", "failed"}, timeout=60)
        buried = _wait_state(r, prefix, "buried", {"cancelled", "done", "failed"}, timeout=60)
    finally:
        assert second.stop() == 0
    assert cancelled["state"] == "cancelled" and buried["state"] == "failed" and "gave up" in buried["error"]
    assert list((roots / "out").iterdir()) == []  # neither ran again, and nothing is left behind


@pytest.mark.slow  # 30 s; the ownership rules it rests on run by default in the update_if test below
def test_a_daemon_that_stalls_and_loses_its_job_stops_instead_of_running_it_twice(redis_server, roots):
    clip = make_clip(roots / "in" / "v.mp4", frames=600, audio=False)
    prefix = unique_prefix()
    out = roots / "out" / "v.mp4"
    a = Daemon(redis_server, prefix, roots, name="a")
    b = Daemon(redis_server, prefix, roots, name="b")
    r = redis_server.client()
    try:
        b.proc.send_signal(signal.SIGSTOP)  # a takes the job
        r.xadd(f"{prefix}:jobs", {"id": "v", "input": str(clip.path), "output": str(out),
                                  "options": json.dumps({"faces": str(clip.faces_path)})})
        _wait_progress(r, prefix, "v", 0.1, a)
        a.proc.send_signal(signal.SIGSTOP)  # a stalls (a VM pause, a swap storm) past claim_idle_s
        b.proc.send_signal(signal.SIGCONT)
        deadline = time.monotonic() + 60
        while not (_job(r, prefix, "v").get("attempts") == "2" and float(_job(r, prefix, "v")["progress"] or 0) > 0.05):
            assert time.monotonic() < deadline, b.text()
            time.sleep(0.05)
        b_id = _job(r, prefix, "v")["daemon"]
        a.proc.send_signal(signal.SIGCONT)
        time.sleep(3)  # a's housekeeping runs again
        assert _job(r, prefix, "v")["state"] == "running", "the job ended too soon to see a and b side by side"
        owners = [p["consumer"].decode() for p in r.xpending_range(f"{prefix}:jobs", prefix, "-", "+", 5)]
        assert owners == [b_id]  # a did not steal it back
        job = _wait_state(r, prefix, "v", {"done", "failed"}, timeout=120)
        time.sleep(3)  # what a would still write
        job = _job(r, prefix, "v")
    finally:
        for d in (a, b):
            d.proc.send_signal(signal.SIGCONT)
            assert d.stop() == 0
    states = [e["state"] for e in _events(r, prefix, "v") if "state" in e]
    assert job["state"] == "done" and job["attempts"] == "2" and states[-1] == "done", (job, states)
    assert states.count("done") == 1 and "queued" not in states[states.index("done"):], states
    assert "done:" not in a.text() and "done:" in b.text()  # only b finished the work
    assert "taken over by another daemon" in a.text() or "no longer this run's" in a.text(), a.text()
    assert r.xpending(f"{prefix}:jobs", prefix)["pending"] == 0
    assert len(read_frames(out)[0]) == 600 and sorted(p.name for p in (roots / "out").iterdir()) == ["v.mp4"]


def test_a_stale_entry_behind_many_live_ones_is_taken_over(redis_server):
    from configs.keys import Keys
    from streamer.serve.queue import JobQueue

    r, keys = redis_server.client(), Keys(unique_prefix())
    alive, dead, new = (JobQueue(r, keys, name) for name in ("alive", "dead", "new"))
    alive.ensure_group()
    for i in range(41):
        r.xadd(keys.jobs, {"id": f"j{i}", "input": "/in/a.mp4", "output": f"/out/{i}.mp4"})
    held = [entry for entry, _ in alive.read(40, block_ms=100)]  # long jobs on a living daemon
    [(lost, _)] = dead.read(1, block_ms=100)  # the job of a daemon that was killed
    time.sleep(1.2)
    assert alive.touch(held) == []  # the living daemon's housekeeping
    taken = new.claim_stale(1, min_idle_s=1.0)  # one free slot: XAUTOCLAIM looks at 10 entries a call
    assert [entry for entry, _ in taken] == [lost]
    assert {p["consumer"] for p in r.xpending_range(keys.jobs, keys.group, "-", "+", 50)} == {b"alive", b"new"}


def test_a_job_survives_a_redis_restart(redis_server, roots):
    clip = make_clip(roots / "in" / "r.mp4", frames=120, audio=False)
    prefix = unique_prefix()
    daemon = Daemon(redis_server, prefix, roots)
    r = redis_server.client()
    try:
        r.xadd(f"{prefix}:jobs", {"id": "r", "input": str(clip.path), "output": str(roots / "out" / "r.mp4"),
                                  "options": json.dumps({"faces": str(clip.faces_path)})})
        _wait_state(r, prefix, "r", {"running"})
        redis_server.stop()
        time.sleep(3)  # the job goes on without Redis
        redis_server.start()
        r = redis_server.client()
        job = _wait_state(r, prefix, "r", {"done", "failed"}, timeout=120)
    finally:
        assert daemon.stop() == 0
    assert job["state"] == "done" and len(read_frames(roots / "out" / "r.mp4")[0]) == 120
    assert r.xpending(f"{prefix}:jobs", prefix)["pending"] == 0


def test_redis_refusing_writes_for_a_while_delays_the_state_but_the_job_finishes(redis_server, roots):
    clip = make_clip(roots / "in" / "m.mp4", frames=60, audio=False)
    out = roots / "out" / "m.mp4"
    prefix = unique_prefix()
    daemon = Daemon(redis_server, prefix, roots)
    r = redis_server.client()
    try:
        r.xadd(f"{prefix}:jobs", {"id": "m", "input": str(clip.path), "output": str(out),
                                  "options": json.dumps({"faces": str(clip.faces_path)})})
        _wait_state(r, prefix, "m", {"running"})
        r.config_set("maxmemory", 1)  # every write is refused: "OOM command not allowed"
        try:
            deadline = time.monotonic() + 60
            while not out.exists():  # the job finishes while Redis refuses its final write
                assert time.monotonic() < deadline and daemon.proc.poll() is None, daemon.text()
                time.sleep(0.1)
            time.sleep(2)  # the housekeeping writes and the final write meet the refusal
            assert daemon.proc.poll() is None, daemon.text()
            assert _job(r, prefix, "m")["state"] == "running"
        finally:
            r.config_set("maxmemory", 0)
        job = _wait_state(r, prefix, "m", {"done", "failed", "queued"}, timeout=30)
    finally:
        assert daemon.stop() == 0
    assert job["state"] == "done" and job["attempts"] == "1", job
    assert "OutOfMemoryError" in daemon.text() or "maxmemory" in daemon.text()
    assert r.xpending(f"{prefix}:jobs", prefix)["pending"] == 0 and not _leftovers(roots / "out")


def test_a_redis_error_as_a_job_starts_leaves_no_phantom_run_behind(redis_server, roots):
    clip = make_clip(roots / "in" / "s.mp4", frames=3, width=96, height=72, face_px=30, audio=False)
    prefix = unique_prefix()
    daemon = Daemon(redis_server, prefix, roots, extra=["--concurrency", "1"])
    r = redis_server.client()
    r.set(f"{prefix}:events", "not a stream")  # the "running" write's event is refused: WRONGTYPE
    try:
        for job_id in ("a", "b"):
            r.xadd(f"{prefix}:jobs", {"id": job_id, "input": str(clip.path), "output": str(roots / "out" / f"{job_id}.mp4"),
                                      "options": json.dumps({"faces": str(clip.faces_path)})})
        deadline = time.monotonic() + 30
        while "WRONGTYPE" not in daemon.text():
            assert time.monotonic() < deadline and daemon.proc.poll() is None, daemon.text()
            time.sleep(0.1)
        r.delete(f"{prefix}:events")  # Redis takes writes again
        jobs = [_wait_state(r, prefix, job_id, {"done", "failed"}, timeout=60) for job_id in ("a", "b")]
    finally:
        assert daemon.stop() == 0
    assert [job["state"] for job in jobs] == ["done", "done"], jobs
    assert r.xpending(f"{prefix}:jobs", prefix)["pending"] == 0


def test_cancel_while_queued_and_while_running(redis_server, roots):
    clip = make_clip(roots / "in" / "c.mp4", frames=150, audio=False)
    prefix = unique_prefix()
    daemon = Daemon(redis_server, prefix, roots, extra=["--concurrency", "1"])
    r = redis_server.client()
    faces = json.dumps({"faces": str(clip.faces_path)})
    try:
        for job_id in ("running", "queued"):
            r.xadd(f"{prefix}:jobs", {"id": job_id, "input": str(clip.path), "output": str(roots / "out" / f"{job_id}.mp4"),
                                      "options": faces})
        _wait_state(r, prefix, "running", {"running"})
        r.hset(f"{prefix}:job:queued", "cancel", "1")  # before any daemon took it
        time.sleep(0.5)
        asked = time.monotonic()
        r.hset(f"{prefix}:job:running", "cancel", "1")
        job = _wait_state(r, prefix, "running", {"cancelled", "done", "failed"}, timeout=10)
        took = time.monotonic() - asked
        queued = _wait_state(r, prefix, "queued", {"cancelled", "done", "failed"}, timeout=30)
    finally:
        assert daemon.stop() == 0
    assert job["state"] == "cancelled" and took < 1.5, (job, took)
    assert queued["state"] == "cancelled" and queued["attempts"] == "0"
    assert list((roots / "out").iterdir()) == []


def test_bad_jobs_fail_with_a_clear_reason_and_the_daemon_keeps_serving(redis_server, roots):
    clip = make_clip(roots / "in" / "ok.mp4", frames=3, width=96, height=72, face_px=30, audio=False)
    (roots / "in" / "notes.mp4").write_text("not a video\n" * 100)
    outside = roots / "secret.mp4"
    outside.write_bytes(clip.path.read_bytes())
    (roots / "in" / "link.mp4").symlink_to(outside)
    ok_in, out = str(clip.path), str(roots / "out")
    bad = {
        "no-input": ({"output": f"{out}/x.mp4"}, "missing field 'input'"),
        "missing": ({"input": f"{ok_in}.nope", "output": f"{out}/x.mp4"}, "does not exist"),
        "not-video": ({"input": str(roots / "in" / "notes.mp4"), "output": f"{out}/x.mp4"}, "not a readable video"),
        "outside": ({"input": str(outside), "output": f"{out}/x.mp4"}, "outside the allowed folders"),
        "dotdot": ({"input": f"{roots}/in/../secret.mp4", "output": f"{out}/x.mp4"}, "outside the allowed folders"),
        "symlink": ({"input": str(roots / "in" / "link.mp4"), "output": f"{out}/x.mp4"}, "outside the allowed folders"),
        "out-outside": ({"input": ok_in, "output": str(roots / "x.mp4")}, "outside the allowed folders"),
        "url": ({"input": "http://example.com/a.mp4", "output": f"{out}/x.mp4"}, "live input http://example.com is "
                "not allowed here"),
        "file-url": ({"input": "file:///etc/passwd", "output": f"{out}/x.mp4"}, "not a local path"),
        "unknown-option": ({"input": ok_in, "output": f"{out}/x.mp4", "options": '{"sharpness": 3}'},
                           "unknown option 'sharpness'"),
        "process-setting": ({"input": ok_in, "output": f"{out}/x.mp4", "options": '{"workers": 8}'},
                            "'workers' is a process setting"),
        "bad-json": ({"input": ok_in, "output": f"{out}/x.mp4", "options": "{crf: 3"}, "not valid JSON"),
        "bad-field": ({"input": ok_in, "output": f"{out}/x.mp4", "priority": "high"}, "unknown field(s) priority"),
        # entries that made the parser itself raise (urlsplit's ValueError, json's RecursionError)
        "bad-ipv6-url": ({"input": "rtsp://[::1", "output": f"{out}/x.mp4"}, "input is not a valid URL"),
        "bad-output-url": ({"input": "rtsp://127.0.0.1:9/cam", "output": "http://[x"}, "output is not a valid URL"),
        # a stream output not in serve.live_outputs: the daemon does not send pictures anywhere a submitter says
        "output-not-allowed": ({"input": "rtsp://127.0.0.1:9/cam", "output": "rtmp://elsewhere.example/live/x"},
                               "live output rtmp://elsewhere.example is not allowed here (serve.live_outputs"),
        "deep-json": ({"input": ok_in, "output": f"{out}/x.mp4", "options": "[" * 100000},
                      "options is not usable JSON"),
    }
    prefix = unique_prefix()
    daemon = Daemon(redis_server, prefix, roots, env={"GPEN_STREAM_SERVE_LIVE_SOURCES": '["rtsp://127.0.0.1"]'})
    r = redis_server.client()
    try:
        for job_id, (fields, _) in bad.items():
            r.xadd(f"{prefix}:jobs", {"id": job_id, **fields})
        r.xadd(f"{prefix}:jobs", {"id": "fine", "input": ok_in, "output": f"{out}/fine.mp4",
                                  "options": json.dumps({"faces": str(clip.faces_path)})})
        results = {job_id: _wait_state(r, prefix, job_id, {"done", "failed"}) for job_id in [*bad, "fine"]}
    finally:
        assert daemon.stop() == 0
    for job_id, (_, message) in bad.items():
        assert results[job_id]["state"] == "failed" and message in results[job_id]["error"], (job_id, results[job_id])
    assert results["fine"]["state"] == "done"
    assert r.xpending(f"{prefix}:jobs", prefix)["pending"] == 0  # each acknowledged once
    assert "Traceback" not in daemon.text()
    assert sorted(p.name for p in (roots / "out").iterdir()) == ["fine.mp4"]


def test_an_entry_that_breaks_the_parser_fails_its_job_and_the_daemon_keeps_serving(redis_server, roots):
    clip = make_clip(roots / "in" / "ok.mp4", frames=3, width=96, height=72, face_px=30, audio=False)
    prefix = unique_prefix()
    daemon = Daemon(redis_server, prefix, roots, extra=["--concurrency", "1"])
    r = redis_server.client()
    try:
        # a lone surrogate in a path: no check foresaw it, the file system refuses to encode it
        r.xadd(f"{prefix}:jobs", {"id": "poison", "input": str(clip.path), "output": str(roots / "out" / "x.mp4"),
                                  "options": '{"faces": "%s/\\ud800.jsonl"}' % (roots / "in")})
        r.xadd(f"{prefix}:jobs", {"id": "fine", "input": str(clip.path), "output": str(roots / "out" / "fine.mp4"),
                                  "options": json.dumps({"faces": str(clip.faces_path)})})
        poison = _wait_state(r, prefix, "poison", {"done", "failed"}, timeout=30)
        fine = _wait_state(r, prefix, "fine", {"done", "failed"}, timeout=60)
        assert daemon.proc.poll() is None, daemon.text()
    finally:
        assert daemon.stop() == 0
    assert poison["state"] == "failed" and "could not be read: UnicodeEncodeError" in poison["error"], poison
    assert fine["state"] == "done"
    assert r.xpending(f"{prefix}:jobs", prefix)["pending"] == 0


def test_a_job_that_fails_every_attempt_ends_in_the_dead_letter_stream(redis_server, roots, tmp_path):
    clip = make_clip(roots / "in" / "d.mp4", frames=3, width=96, height=72, face_px=30, audio=False)
    prefix = unique_prefix()
    nowhere = f"ipc://{tmp_path}/no-worker.sock"  # a worker that never answers: every run fails, transiently
    daemon = Daemon(redis_server, prefix, roots, extra=["--connect", nowhere],
                    env={"GPEN_STREAM_SERVE_MAX_ATTEMPTS": "2", "GPEN_STREAM_ENGINE_CONNECT_TIMEOUT_S": "0.5"})
    r = redis_server.client()
    try:
        r.xadd(f"{prefix}:jobs", {"id": "doomed", "input": str(clip.path), "output": str(roots / "out" / "d.mp4"),
                                  "options": json.dumps({"faces": str(clip.faces_path)})})
        job = _wait_state(r, prefix, "doomed", {"failed"}, timeout=60)
    finally:
        assert daemon.stop() == 0
    assert job["attempts"] == "2" and "gave up after 2 attempts" in job["error"] and "no worker" in job["error"]
    [(_, dead)] = r.xrange(f"{prefix}:jobs:dead")
    assert dead[b"id"] == b"doomed" and b"gave up" in dead[b"error"]
    assert r.xpending(f"{prefix}:jobs", prefix)["pending"] == 0


def _a_running_job(redis_server, roots, job_id: str, *, frames: int, env=None):
    """A daemon running job ``job_id`` (a clip of ``frames`` frames, written to out/<id>.mp4)."""
    clip = make_clip(roots / "in" / f"{job_id}.mp4", frames=frames, audio=False)
    prefix = unique_prefix()
    daemon = Daemon(redis_server, prefix, roots, env=env)
    r = redis_server.client()
    r.xadd(f"{prefix}:jobs", {"id": job_id, "input": str(clip.path), "output": str(roots / "out" / f"{job_id}.mp4"),
                              "options": json.dumps({"faces": str(clip.faces_path)})})
    _wait_state(r, prefix, job_id, {"running"})
    return daemon, r, prefix


def test_sigterm_lets_the_running_job_finish_then_exits_0(redis_server, roots):
    daemon, r, prefix = _a_running_job(redis_server, roots, "t", frames=60)
    assert daemon.stop(signal.SIGTERM) == 0
    assert _job(r, prefix, "t")["state"] == "done" and len(read_frames(roots / "out" / "t.mp4")[0]) == 60


def test_sigterm_past_the_drain_time_leaves_the_job_pending_for_another_daemon(redis_server, roots):
    daemon, r, prefix = _a_running_job(redis_server, roots, "p", frames=300, env={"GPEN_STREAM_SERVE_DRAIN_S": "0.5"})
    assert daemon.stop(signal.SIGTERM) == 0
    job = _job(r, prefix, "p")
    assert job["state"] == "queued" and "will run again" in job["error"]
    assert r.xpending(f"{prefix}:jobs", prefix)["pending"] == 1 and not list((roots / "out").iterdir())


def test_a_cancel_sent_while_the_daemon_drains_cancels_the_job(redis_server, roots):
    daemon, r, prefix = _a_running_job(redis_server, roots, "c", frames=900, env={"GPEN_STREAM_SERVE_DRAIN_S": "60"})
    daemon.proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    r.hset(f"{prefix}:job:c", "cancel", 1)
    assert daemon.stop(signal.SIGTERM) == 0
    job = _job(r, prefix, "c")
    assert job["state"] == "cancelled", job
    assert not list((roots / "out").iterdir())


def test_sigterm_restarts_do_not_count_as_failed_attempts(redis_server, roots):
    clip = make_clip(roots / "in" / "g.mp4", frames=300, audio=False)
    prefix = unique_prefix()
    # one attempt allowed: a restart that counted would bury the job at the next daemon
    env = {"GPEN_STREAM_SERVE_DRAIN_S": "0.5", "GPEN_STREAM_SERVE_MAX_ATTEMPTS": "1"}
    r = redis_server.client()
    r.xadd(f"{prefix}:jobs", {"id": "g", "input": str(clip.path), "output": str(roots / "out" / "g.mp4"),
                              "options": json.dumps({"faces": str(clip.faces_path)})})
    daemon = Daemon(redis_server, prefix, roots, name="d0", env=env)  # a rolling restart in the middle of the job
    _wait_state(r, prefix, "g", {"running"})
    assert daemon.stop(signal.SIGTERM) == 0
    job = _job(r, prefix, "g")
    assert job["state"] == "queued" and job["attempts"] == "0", job
    last = Daemon(redis_server, prefix, roots, name="last", env={"GPEN_STREAM_SERVE_MAX_ATTEMPTS": "1"})
    try:
        job = _wait_state(r, prefix, "g", {"done", "failed"}, timeout=120)
    finally:
        assert last.stop() == 0
    assert job["state"] == "done" and job["attempts"] == "1", job
    assert r.xlen(f"{prefix}:jobs:dead") == 0


def test_a_config_feed_cancelled_once_does_not_expire_when_it_runs_again(redis_server, roots):
    prefix = unique_prefix()
    r = redis_server.client()
    r.hset(f"{prefix}:job:door", mapping={"state": "cancelled", "entry": "config:door"})  # an earlier run's end
    r.expire(f"{prefix}:job:door", 300)
    feed = [{"id": "door", "input": "rtsp://127.0.0.1:9/cam", "output": str(roots / "out" / "door.mkv")}]
    daemon = Daemon(redis_server, prefix, roots, env={"GPEN_STREAM_SERVE_STREAMS": json.dumps(feed)})
    try:
        assert _job(r, prefix, "door")["attempts"] == "1"  # started again
        assert r.ttl(f"{prefix}:job:door") == -1  # and kept while it runs
    finally:
        assert daemon.stop() == 0


def test_serve_without_redis_says_so_in_one_line(roots):
    from tests.support.redis_server import free_port

    result = subprocess.run([*CLI, "serve", "--redis", f"redis://127.0.0.1:{free_port()}/0", "--input-root",
                             str(roots / "in"), "--output-root", str(roots / "out"), "--model", "identity"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "cannot reach Redis" in result.stderr and "redis-server --port" in result.stderr


def test_clients_submit_follow_and_list_jobs(redis_server, roots):
    clip = make_clip(roots / "in" / "w.mp4", frames=6, width=96, height=72, face_px=30, audio=False)
    prefix = unique_prefix()
    daemon = Daemon(redis_server, prefix, roots)
    try:
        common = ["--redis", redis_server.url, "--prefix", prefix]
        result = subprocess.run([*CLI, "submit", str(clip.path), "-o", str(roots / "out" / "w.mp4"), "--id", "w",
                                 "--option", f"faces={clip.faces_path}", "--option", "crf=20", "--wait", *common],
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        assert result.stdout.splitlines()[0] == "w" and json.loads(result.stdout.splitlines()[-1])["state"] == "done"
        status = subprocess.run([*CLI, "status", "w", *common], capture_output=True, text=True, timeout=60)
        assert json.loads(status.stdout)["state"] == "done"
        listing = subprocess.run([*CLI, "jobs", *common], capture_output=True, text=True, timeout=60)
        assert "w " in listing.stdout and "done" in listing.stdout
    finally:
        assert daemon.stop() == 0


def test_watch_sees_a_job_end_between_its_reads_while_other_jobs_are_busy(redis_server):
    import threading

    from streamer.serve.client import RECHECK_S, Client

    prefix = unique_prefix()
    r = redis_server.client()
    client = Client(redis_server.url, prefix)
    stop = threading.Event()

    def busy():  # another job's progress: the events never go quiet
        while not stop.is_set():
            r.xadd(f"{prefix}:events", {"id": "other", "progress": "0.5"})
            stop.wait(0.3)

    threading.Thread(target=busy, daemon=True).start()
    try:
        r.hset(f"{prefix}:job:mine", mapping={"state": "running", "progress": "0.99"})
        watching = client.watch("mine", timeout_s=15)
        assert next(watching)["state"] == "running"
        r.hset(f"{prefix}:job:mine", "state", "done")  # it ends now, before watch reads the events
        r.xadd(f"{prefix}:events", {"id": "mine", "state": "done"})
        started = time.monotonic()
        assert [e.get("state") for e in watching] == ["done"] and time.monotonic() - started < 3

        r.hset(f"{prefix}:job:trimmed", mapping={"state": "running"})
        watching = client.watch("trimmed", timeout_s=15)
        next(watching)
        r.hset(f"{prefix}:job:trimmed", "state", "failed")  # its event lost (trimmed, a capped stream)
        started = time.monotonic()
        assert [e.get("state") for e in watching] == ["failed"] and time.monotonic() - started < RECHECK_S + 2
    finally:
        stop.set()


def test_redis_urls_with_a_password_work_and_are_never_logged(tmp_path, roots):
    from tests.support.redis_server import RedisServer

    server = RedisServer(tmp_path / "auth", password="s3cret-pw").start()
    try:
        clip = make_clip(roots / "in" / "a.mp4", frames=3, width=96, height=72, face_px=30, audio=False)
        prefix = unique_prefix()
        daemon = Daemon(server, prefix, roots)
        r = server.client()
        r.xadd(f"{prefix}:jobs", {"id": "a", "input": str(clip.path), "output": str(roots / "out" / "a.mp4"),
                                  "options": json.dumps({"faces": str(clip.faces_path)})})
        assert _wait_state(r, prefix, "a", {"done", "failed"})["state"] == "done"
        assert daemon.stop() == 0
        assert "s3cret-pw" not in daemon.text() and "***" in daemon.text()
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(port=server.port).ping()
    finally:
        server.stop()


@pytest.mark.parametrize("url, shown", [
    ("redis://:pw@127.0.0.1:6379/0", "redis://:***@127.0.0.1:6379/0"),
    ("redis://127.0.0.1:6379/0?password=pw&db=1", "redis://127.0.0.1:6379/0?password=***&db=1"),
    ("rediss://user:pw@[::1]:6380/2", "rediss://user:***@[::1]:6380/2"),
    ("srt://cam:9000?passphrase=pw&latency=20", "srt://cam:9000?passphrase=***&latency=20"),
    ("rtsp://[::1", "rtsp://(a URL that cannot be parsed)"),
    ("rtsp://admin:pa#ss@cam/stream", "rtsp://admin:***@cam/stream"),  # characters a URL parser stops at
    ("rtsp://admin:p/w?x@cam:554/s", "rtsp://admin:***@cam:554/s"),
    ("rtsp://admin:p'w@cam/x", "rtsp://admin:***@cam/x"),
    ("rtsp://admin:p@ss@cam/x", "rtsp://admin:***@cam/x"),
    ("/media/out/a.mp4", "/media/out/a.mp4"),
])
def test_redact_hides_passwords_and_keeps_the_rest_of_the_url(url, shown):
    from streamer.logs import redact, redact_text

    assert redact(url) == shown
    assert redact_text(f"cannot open '{url}': refused") == f"cannot open '{shown}': refused"


def test_credentials_in_urls_never_reach_the_daemon_log(tmp_path, roots):
    from types import SimpleNamespace

    from tests.support.redis_server import RedisServer

    server = RedisServer(tmp_path / "auth", password="s3cret-pw").start()
    try:
        by_query = SimpleNamespace(url=f"redis://127.0.0.1:{server.port}/0?password=s3cret-pw", client=server.client)
        prefix = unique_prefix()
        daemon = Daemon(by_query, prefix, roots, env={"GPEN_STREAM_SERVE_LIVE_SOURCES": '["rtsp://127.0.0.1"]',
                                                      "GPEN_STREAM_SERVE_LIVE_OUTPUTS": '["rtsp://127.0.0.1"]'})
        r = server.client()
        r.xadd(f"{prefix}:jobs", {"id": "cam", "input": "rtsp://admin:cam-s3cret@127.0.0.1:9/stream",
                                  "output": "rtsp://pub:out-s3cret@127.0.0.1:9/out"})
        deadline = time.monotonic() + 30
        while "running rtsp://" not in daemon.text():
            assert time.monotonic() < deadline, daemon.text()
            time.sleep(0.1)
        time.sleep(2)  # the camera refuses: what the live source logs about it
        r.hset(f"{prefix}:job:cam", "cancel", "1")
        job = _wait_state(r, prefix, "cam", {"cancelled", "failed"}, timeout=30)
        assert daemon.stop() == 0
    finally:
        server.stop()
    for secret in ("s3cret-pw", "cam-s3cret", "out-s3cret"):
        assert secret not in daemon.text() and secret not in job.get("error", ""), secret
    assert "password=***" in daemon.text() and "rtsp://admin:***@127.0.0.1:9/stream" in daemon.text()


def test_a_stream_job_runs_live_with_its_figures_in_the_hash_until_cancelled(redis_server, roots,
                                                                              retinaface_mobile_weights):
    from tests.support.streams import Publisher, RtspRelay, read_frame_indices, rtsp_relay_unavailable

    if rtsp_relay_unavailable() is not None:
        pytest.skip(str(rtsp_relay_unavailable()))
    clip = make_clip(roots / "in" / "cam.mp4", frames=30, fps=15, audio=False)
    prefix = unique_prefix()
    # random detector weights find "faces" everywhere: a small picture keeps detection cheap
    options = json.dumps({"detector": "retinaface_mobile0.25", "detect_threshold": 0.02, "max_faces": 2,
                          "min_face": 0, "detect_max_side": 160, "preset": "ultrafast"})
    recording = roots / "out" / "cam.mkv"
    with RtspRelay() as relay, Publisher(relay.publish_url, clip.path, fps=15):
        relay.wait_publishing(20)
        daemon = Daemon(redis_server, prefix, roots, env={
            "GPEN_STREAM_SERVE_LIVE_SOURCES": '["rtsp://127.0.0.1"]',
            "GPEN_STREAM_ENGINE_DETECTOR_WEIGHTS": str(retinaface_mobile_weights)})
        r = redis_server.client()
        try:
            r.xadd(f"{prefix}:jobs", {"id": "cam", "input": relay.play_url, "output": str(recording),
                                      "options": options})
            deadline = time.monotonic() + 60
            while True:
                job = _job(r, prefix, "cam")
                assert job.get("state") not in ("failed", "done") and time.monotonic() < deadline, (job, daemon.text())
                if job.get("state") == "running" and float(job.get("frames_out") or 0) >= 30:
                    break
                time.sleep(0.2)
            assert float(job["fps_out"]) > 0 and job["hit_rate"] != ""
            r.hset(f"{prefix}:job:cam", "cancel", "1")
            job = _wait_state(r, prefix, "cam", {"cancelled", "done", "failed"}, timeout=10)
        finally:
            assert daemon.stop() == 0
    assert job["state"] == "cancelled"  # cancelling is how a live job ends; what it recorded stays
    recorded = read_frame_indices(recording)
    assert len(recorded.frames) >= 30 and recorded.pts_increasing()


def test_a_running_jobs_hash_lost_with_redis_data_is_written_again_not_taken_for_a_takeover(redis_server):
    from configs.keys import Keys
    from streamer.serve.state import JobStore

    r = redis_server.client()
    keys = Keys(unique_prefix())
    store = JobStore(r, keys)
    store.register("j", "1-0", {"input": "/in/a.mp4"})
    identity = {"state": "running", "entry": "1-0", "input": "/in/a.mp4", "daemon": "D", "attempts": 1}
    assert store.update_if("j", identity)
    r.delete(keys.job("j"))  # Redis restarted without its data under the running job
    assert store.update_if("j", {"progress": 0.6}, owner=("D", 1), recreate=identity)
    job = _job(r, keys.prefix, "j")
    assert job["state"] == "running" and job["daemon"] == "D" and job["progress"] == "0.6"
    r.hset(keys.job("j"), mapping={"daemon": "E", "attempts": 2})  # taken over: still refused
    assert not store.update_if("j", {"progress": 0.7}, owner=("D", 1), recreate=identity)
    assert store.update_if("j", {"state": "done"}, owner=("E", 2))
    assert not store.update_if("j", {"state": "queued"})  # nothing turns a finished job back
    assert _job(r, keys.prefix, "j")["state"] == "done"


def test_a_config_feed_runs_at_one_daemon_of_those_sharing_the_config_and_moves_when_it_stops(redis_server, roots):
    prefix = unique_prefix()
    r = redis_server.client()
    feed = [{"id": "gate", "input": "rtsp://127.0.0.1:9/cam", "output": str(roots / "out" / "gate.mkv")}]
    env = {"GPEN_STREAM_SERVE_STREAMS": json.dumps(feed)}
    first = Daemon(redis_server, prefix, roots, name="a", env=env)
    second = Daemon(redis_server, prefix, roots, name="b", env=env)
    try:
        time.sleep(3)  # a few housekeeping rounds of both
        runs = [d for d in (first, second) if "running rtsp://127.0.0.1:9/cam" in d.text()]
        assert len(runs) == 1, [d.text()[-500:] for d in (first, second)]
        owner, other = (first, second) if runs[0] is first else (second, first)
        assert _job(r, prefix, "gate")["state"] == "running"
        assert owner.stop() == 0
        deadline = time.monotonic() + 15
        while "running rtsp://127.0.0.1:9/cam" not in other.text():
            assert time.monotonic() < deadline, other.text()[-800:]
            time.sleep(0.2)
        assert _wait_state(r, prefix, "gate", {"running"}, timeout=10)
    finally:
        first.stop()
        second.stop()
