"""A worker's registration in Redis, so decoders find it (``<prefix>:worker:<id>``, a hash):

    endpoint   where decoders connect (tcp://host:port)
    host, device, pid, version, started
    models     JSON list: what it can serve       loaded   JSON list: what is in memory now
    batch, credits, load (crops queued or being restored), restored (in all), memory_mib (its lease)
    updated    time of the last heartbeat

The key expires ``registry_ttl_s`` after the last heartbeat (a heartbeat every third of that),
so a worker that dies leaves the directory on its own; a clean exit deletes it at once, and
releases the worker's memory lease.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version

from configs.keys import Keys

log = logging.getLogger(__name__)


def _version() -> str:
    try:
        return version("gpen-stream")
    except PackageNotFoundError:
        return "dev"


class Registration:
    def __init__(self, redis, keys: Keys, worker, *, endpoint: str, ttl_s: float, budget=None):
        self.redis, self.keys, self.worker = redis, keys, worker
        self.endpoint, self.ttl_s, self.budget = endpoint, ttl_s, budget
        self.key = keys.worker(worker.id)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.started = datetime.now(timezone.utc).isoformat(timespec="seconds")

    def fields(self) -> dict[str, str]:
        state = self.worker.status()
        return {"endpoint": self.endpoint, "host": socket.gethostname(), "device": self.worker.device,
                "pid": str(os.getpid()), "version": _version(), "started": self.started,
                "models": json.dumps(state["models"]), "loaded": json.dumps(state["loaded"]),
                "batch": str(state["batch"]), "credits": str(state["credits"]), "load": str(state["load"]),
                "restored": str(state["restored"]),
                "memory_mib": str(self.budget.mib if self.budget is not None else 0),
                "updated": datetime.now(timezone.utc).isoformat(timespec="milliseconds")}

    def beat(self) -> None:
        p = self.redis.pipeline(transaction=True)
        p.hset(self.key, mapping=self.fields())
        p.expire(self.key, max(1, int(round(self.ttl_s))))
        p.execute()

    def start(self) -> "Registration":
        self.beat()
        self._thread = threading.Thread(target=self._loop, name="registry", daemon=True)
        self._thread.start()
        log.info("registered as %s (%s)", self.key, self.endpoint)
        return self

    def _loop(self) -> None:
        while not self._stop.wait(self.ttl_s / 3):
            try:
                self.beat()
            except Exception as exc:  # Redis away: keep serving the decoders we have; try again
                log.warning("registry heartbeat failed: %s", exc)

    def withdraw(self) -> None:
        """Leave the directory (the worker is draining: decoders must not pick it any more);
        the memory lease is kept until stop()."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(5)
        try:
            self.redis.delete(self.key)
        except Exception as exc:
            log.warning("could not remove our registration: %s", exc)

    def stop(self) -> None:
        self.withdraw()
        if self.budget is not None:
            try:
                self.budget.release()
            except Exception as exc:
                log.warning("could not release our memory lease: %s", exc)


def registered_workers(redis, keys: Keys) -> list[dict]:
    """Every live registration (decoded), in no particular order."""
    names = list(redis.scan_iter(match=keys.workers_pattern, count=500))
    if not names:
        return []
    p = redis.pipeline(transaction=False)
    for name in names:
        p.hgetall(name)
    out = []
    for name, raw in zip(names, p.execute()):
        if not raw:
            continue  # expired between SCAN and HGETALL
        entry = {(k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
                 for k, v in raw.items()}
        for listed in ("models", "loaded"):
            try:
                entry[listed] = json.loads(entry.get(listed) or "[]")
            except json.JSONDecodeError:
                entry[listed] = []
        entry["id"] = (name.decode() if isinstance(name, bytes) else name).rsplit(":", 1)[1]
        out.append(entry)
    return out


def wait_for_workers(redis, keys: Keys, model: str, timeout_s: float) -> list[dict]:
    deadline = time.monotonic() + timeout_s
    while True:
        found = [w for w in registered_workers(redis, keys) if model in w["models"]]
        if found or time.monotonic() > deadline:
            return found
        time.sleep(0.2)
