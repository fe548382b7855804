"""Workers that a decoder starts for itself (embedded mode): a thread (``inproc://``) when one
worker is enough, else one process per worker (``ipc://``), started as
``python -m streamer worker`` with its settings in ``GPEN_STREAM_WORKER_*`` variables.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import zmq

from configs import WorkerSettings
from workers.build import build_worker

log = logging.getLogger(__name__)


@dataclass
class LocalWorker:
    endpoint: str
    is_alive: Callable[[], bool]
    describe: Callable[[], str]
    stop: Callable[[], None]
    pid: int | None = None


@dataclass
class LocalWorkers:
    workers: list[LocalWorker] = field(default_factory=list)
    _tmp: str | None = None

    def stop(self) -> None:
        for w in self.workers:
            w.stop()
        if self._tmp:
            shutil.rmtree(self._tmp, ignore_errors=True)


def devices_for(settings: WorkerSettings, count: int) -> list[str]:
    """One device per worker: CUDA workers spread over the GPUs, CPU workers share the CPU."""
    if settings.device == "auto" and torch.cuda.is_available():
        n = torch.cuda.device_count()
        return [f"cuda:{i % n}" for i in range(count or n)]
    return [settings.device] * (count or 1)


def start_local_workers(model: str, settings: WorkerSettings, *, count: int = 0, isolate: bool = False,
                        context: zmq.Context | None = None) -> LocalWorkers:
    """Workers for ``model`` (checkpoint from ``settings.models`` or the weight cache)."""
    devices = devices_for(settings, count)
    pool = LocalWorkers()
    try:
        if len(devices) == 1 and not isolate:
            pool.workers.append(_start_thread(model, settings, devices[0], context or zmq.Context.instance()))
            return pool
        pool._tmp = tempfile.mkdtemp(prefix="gpen-stream-")
        threads = settings.threads or (max(1, (os.cpu_count() or 1) // len(devices)) if devices[0] == "cpu" else 0)
        for i, device in enumerate(devices):
            endpoint = _ipc_endpoint(Path(pool._tmp), i)
            pool.workers.append(_start_process(model, settings, device, endpoint, threads,
                                               Path(pool._tmp) / f"worker-{i}.log"))
    except BaseException:
        pool.stop()
        raise
    return pool


def _ipc_endpoint(folder: Path, index: int) -> str:
    """A local socket for worker ``index``: on Linux in the abstract namespace (no file, and no
    107-byte limit on the path of a deep TMPDIR), elsewhere a socket file in ``folder``."""
    if sys.platform.startswith("linux"):
        return f"ipc://@gpen-stream-{os.getpid()}-{uuid.uuid4().hex[:12]}-{index}"
    return f"ipc://{folder}/worker-{index}.sock"


def _start_thread(model: str, settings: WorkerSettings, device: str, context: zmq.Context) -> LocalWorker:
    worker = build_worker([model], settings, device=device, context=context)
    endpoint = worker.bind(f"inproc://gpen-worker-{uuid.uuid4().hex}")
    thread = threading.Thread(target=worker.serve, name="worker", daemon=True)
    thread.start()

    def stop() -> None:
        worker.stop_event.set()
        thread.join(timeout=30)

    def describe() -> str:
        return f": {type(worker.error).__name__}: {worker.error}" if worker.error is not None else ""

    return LocalWorker(endpoint, thread.is_alive, describe, stop)


def _start_process(model: str, settings: WorkerSettings, device: str, endpoint: str, threads: int,
                   log_path: Path) -> LocalWorker:
    env = dict(os.environ)
    values = settings.model_dump(mode="json") | {"device": device, "threads": threads, "endpoint": endpoint}
    for key, value in values.items():
        name = f"GPEN_STREAM_WORKER_{key.upper()}"
        if value is None:  # unset (an empty string would read as "" or Path("."))
            env.pop(name, None)
        else:
            env[name] = json.dumps(value) if isinstance(value, (dict, list)) else str(value)
    cmd = [sys.executable, "-m", "streamer", "worker", "--model", model, "--parent-pid", str(os.getpid())]
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT)

    def describe() -> str:
        code = proc.poll()
        try:
            tail = log_path.read_text(errors="replace").strip().splitlines()[-3:]
        except OSError:
            tail = []
        status = f" with exit code {code}" if code is not None else ""
        return f"{status}: {' | '.join(tail)}" if tail else status

    def stop() -> None:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)  # drain, then exit
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    return LocalWorker(endpoint, lambda: proc.poll() is None, describe, stop, pid=proc.pid)
