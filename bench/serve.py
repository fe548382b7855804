"""The job daemon, measured in one run against its baseline.

throughput  N short identity jobs through one ``gpen-stream serve`` (workers and model loaded
            once, jobs taken from Redis as they come) vs N sequential ``gpen-stream restore``
            processes on the same clip (each starts Python, loads its worker and model, runs,
            exits). Both submit their jobs at once; the clock stops when the last output is in
            place.
latency     submit-to-running with an idle daemon: XADD of one tiny job, then the time until its
            hash says ``running`` (read from the events stream), repeated.

    python bench/serve.py --jobs 20 --latency 50
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.support, beside bench/

import redis  # noqa: E402

from tests.support.clips import make_clip  # noqa: E402
from tests.support.redis_server import RedisServer  # noqa: E402

CLI = [sys.executable, "-m", "streamer"]


def _daemon(server: RedisServer, root: Path, prefix: str, concurrency: int) -> subprocess.Popen:
    proc = subprocess.Popen([*CLI, "serve", "--redis", server.url, "--prefix", prefix, "--input-root", str(root),
                             "--output-root", str(root), "--model", "identity", "--http-port", "0", "--concurrency",
                             str(concurrency), "--log-level", "warning"])
    client = server.client()
    while not client.keys(f"{prefix}:daemon:*"):
        assert proc.poll() is None, "serve did not start"
        time.sleep(0.05)
    return proc


def _wait_done(client: redis.Redis, prefix: str, ids: list[str]) -> None:
    pending = set(ids)
    while pending:
        for job_id in list(pending):
            state = client.hget(f"{prefix}:job:{job_id}", "state")
            if state in (b"done", b"failed"):
                assert state == b"done", client.hgetall(f"{prefix}:job:{job_id}")
                pending.discard(job_id)
        time.sleep(0.02)


def throughput(server: RedisServer, root: Path, args) -> None:
    clip = make_clip(root / "in.mp4", frames=args.frames, width=320, height=240, audio=False)
    options = json.dumps({"faces": str(clip.faces_path)})
    client = server.client()
    daemon = _daemon(server, root, "bench", args.concurrency)
    started = time.perf_counter()
    ids = [f"job{i}" for i in range(args.jobs)]
    for job_id in ids:
        client.xadd("bench:jobs", {"id": job_id, "input": str(clip.path), "output": str(root / f"{job_id}.mp4"),
                                   "options": options})
    _wait_done(client, "bench", ids)
    serve_s = time.perf_counter() - started
    daemon.terminate()
    daemon.wait(60)

    started = time.perf_counter()
    for i in range(args.jobs):
        subprocess.run([*CLI, "restore", str(clip.path), "-o", str(root / f"cli{i}.mp4"), "--model", "identity",
                        "--faces", str(clip.faces_path), "-q", "--log-level", "warning"], check=True)
    cli_s = time.perf_counter() - started
    print(f"{args.jobs} identity jobs of {args.frames} frames 320x240 (cpu, {os.cpu_count()} cores)")
    print(f"one serve daemon (concurrency {args.concurrency})   {serve_s:7.2f} s  ({serve_s / args.jobs:.2f} s/job)")
    print(f"{args.jobs} sequential restore processes      {cli_s:7.2f} s  ({cli_s / args.jobs:.2f} s/job)")
    print(f"speed-up serve / restore processes = {cli_s / serve_s:.2f}x")


def latency(server: RedisServer, root: Path, args) -> None:
    clip = make_clip(root / "tiny.mp4", frames=2, width=64, height=48, face_px=20, audio=False)
    client = server.client()
    daemon = _daemon(server, root, "lat", 1)
    waits = []
    try:
        for i in range(args.latency):
            job_id = f"l{i}"
            last = client.xrevrange("lat:events", count=1)
            cursor = last[0][0] if last else b"0-0"
            submitted = time.perf_counter()
            client.xadd("lat:jobs", {"id": job_id, "input": str(clip.path), "output": str(root / f"l{i}.mp4"),
                                     "options": json.dumps({"faces": str(clip.faces_path)})})
            while True:
                reply = client.xread({"lat:events": cursor}, block=1000, count=10)
                for _, entries in reply or []:
                    for entry, fields in entries:
                        cursor = entry
                        if fields.get(b"id") == job_id.encode() and fields.get(b"state") == b"running":
                            waits.append(time.perf_counter() - submitted)
                            break
                    else:
                        continue
                    break
                else:
                    continue
                break
            _wait_done(client, "lat", [job_id])
    finally:
        daemon.terminate()
        daemon.wait(60)
    ms = sorted(w * 1000 for w in waits)
    p99 = ms[min(len(ms) - 1, int(round(0.99 * (len(ms) - 1))))]
    print(f"submit -> running, idle daemon, {len(ms)} jobs: p50 {statistics.median(ms):.1f} ms, p99 {p99:.1f} ms, "
          f"max {ms[-1]:.1f} ms")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=20)
    ap.add_argument("--frames", type=int, default=10)
    ap.add_argument("--concurrency", type=int, default=2)
    ap.add_argument("--latency", type=int, default=50, help="jobs for the latency figure (0: skip)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="gpen-bench-serve-") as tmp:
        server = RedisServer(Path(tmp) / "redis", appendonly=False).start()
        try:
            throughput(server, Path(tmp), args)
            if args.latency:
                latency(server, Path(tmp), args)
        finally:
            server.stop()


if __name__ == "__main__":
    main()
