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


class RedisDirectory:
    def __init__(self, redis, keys: Keys, *, start_timeout_s: float, model: str | None = None):
        self.redis, self.keys = redis, keys
        self.start_timeout_s, self.model = start_timeout_s, model
        self._lock = threading.Lock()
        self._cache: tuple[float, list[dict]] = (0.0, [])

    def for_model(self, model: str) -> "RedisDirectory":
        return RedisDirectory(self.redis, self.keys, start_timeout_s=self.start_timeout_s, model=model)

    def workers(self) -> list[dict]:
        with self._lock:
            read_at, workers = self._cache
            if time.monotonic() - read_at > REFRESH_S:
                try:
                    workers = registered_workers(self.redis, self.keys)
                except Exception:  # Redis away: keep the last list; the dispatcher watches the workers itself
                    pass
                self._cache = (time.monotonic(), workers)
            return workers

    def serves(self, model: str) -> bool:
        return any(model in w["models"] for w in self.workers())

    def endpoints(self) -> list[WorkerEndpoint]:
        return [WorkerEndpoint(w["endpoint"], self.start_timeout_s) for w in self.workers()
                if self.model is None or self.model in w["models"]]
