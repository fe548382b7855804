"""Finding workers in Redis (``gpen-stream worker --redis URL`` registers them; see
``workers.registry``). A ``RedisDirectory`` is a worker directory for the dispatcher: it lists
the registered workers that serve a model, so workers that join during a job are used and
workers whose registration expired are dropped (their crops go elsewhere)."""

from __future__ import annotations

import threading
import time

from configs.keys import Keys
from streamer.dispatch import WorkerEndpoint
from workers.registry import registered_workers

REFRESH_S = 1.0


class _Listing:
    """The registered workers, read again at most once a second, on a thread of its own: the
    dispatch thread asks every second, and a Redis that stops answering (a partition, not a
    refused connection) would hold it for the client's whole socket timeout, freezing live
    outputs and letting workers forget the decoder. Until a read succeeds the last list stands."""

    def __init__(self, redis, keys: Keys):
        self.redis, self.keys = redis, keys
        self._lock = threading.Lock()
        self._workers: list[dict] | None = None  # None: never read
        self._read_at = 0.0
        self._reading = False
        self._first_read = threading.Event()

    def get(self) -> list[dict]:
        with self._lock:
            first = self._workers is None and not self._reading
            if first or (not self._reading and time.monotonic() - self._read_at > REFRESH_S):
                self._reading = True
                if not first:
                    threading.Thread(target=self._read, name="worker-directory", daemon=True).start()
        if first:  # the first answer is waited for: a job starts from it (so do other callers meanwhile)
            self._read()
        self._first_read.wait()
        with self._lock:
            return self._workers or []

    def _read(self) -> None:
        try:
            workers = registered_workers(self.redis, self.keys)
        except Exception:  # Redis away: keep the last list; the dispatcher watches the workers itself
            workers = None
        with self._lock:
            if workers is not None or self._workers is None:
                self._workers = workers or []
            self._read_at, self._reading = time.monotonic(), False
        self._first_read.set()


class RedisDirectory:
    def __init__(self, redis, keys: Keys, *, start_timeout_s: float, model: str | None = None,
                 listing: _Listing | None = None):
        self.redis, self.keys = redis, keys
        self.start_timeout_s, self.model = start_timeout_s, model
        self._listing = listing or _Listing(redis, keys)

    def for_model(self, model: str) -> "RedisDirectory":
        return RedisDirectory(self.redis, self.keys, start_timeout_s=self.start_timeout_s, model=model,
                              listing=self._listing)

    def workers(self) -> list[dict]:
        return self._listing.get()

    def serves(self, model: str) -> bool:
        return any(model in w["models"] for w in self.workers())

    def endpoints(self) -> list[WorkerEndpoint]:
        return [WorkerEndpoint(w["endpoint"], self.start_timeout_s) for w in self.workers()
                if self.model is None or self.model in w["models"]]
