"""The engine: what a process builds once and every job shares.

A job needs a face detector (and, for ``--mask parse``, a face parser), a ZeroMQ context and
workers that serve its model. Loading RetinaFace and GPEN takes seconds and hundreds of
megabytes, so a process that runs many jobs (``gpen-stream serve``, live feeds) must not pay
that per job. The engine loads each of them on first use and keeps them:

    engine = Engine(engine_settings, worker_settings)
    engine.run(FileSource(a), FileSink(x, ...), options)      # loads detector + model
    engine.run(FileSource(b), FileSink(y, ...), options)      # loads nothing
    engine.close()

Jobs may run at once, each in its own thread(s) (``run`` is thread-safe): they share the
detector (calls are serialised: facexlib's RetinaFace keeps per-call state on the module)
and the workers, which batch the crops of different jobs together. Workers are either this
process's own (a thread, or one process per GPU, started on first use per model and kept
until ``close``) or running ``gpen-stream worker``s named by ``engine.connect`` (or, with a
worker directory, found in Redis).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path

import zmq

from configs import EngineSettings, JobOptions, WorkerSettings
from streamer.dispatch import FILE_POLICY, JobPolicy, WorkerDirectory, WorkerEndpoint
from workers import metrics
from workers.pool import LocalWorkers, start_local_workers
from workers.restorers import crop_size, needs_weights, resolve_device

log = logging.getLogger(__name__)


@dataclass
class StaticDirectory:
    """A fixed list of workers (``--connect``, or the engine's own)."""

    workers: list[WorkerEndpoint]

    def endpoints(self) -> list[WorkerEndpoint]:
        return list(self.workers)

    def for_model(self, model: str) -> "StaticDirectory":
        return self  # every listed worker is expected to serve the job's model


class SharedDetector:
    """A face detector shared by concurrent jobs: one call at a time, each with its job's
    score threshold and detection size."""

    def __init__(self, detector):
        self.detector = detector
        self.lock = threading.Lock()

    def detect(self, rgb, rotation_steps: int, *, threshold: float, max_side: int):
        with self.lock:
            self.detector.threshold, self.detector.max_side = threshold, max_side
            return self.detector.detect(rgb, rotation_steps)

    def detect_region(self, rgb, box, rotation_steps: int, **kwargs):
        """Between full detections: the face again, in a region around its last box."""
        with self.lock:
            return self.detector.detect_region(rgb, box, rotation_steps, **kwargs)


class SharedParser:
    """The face parser shared by concurrent jobs: one call at a time."""

    def __init__(self, parser):
        self.parser = parser
        self.lock = threading.Lock()

    def masks(self, crops):
        with self.lock:
            return self.parser.masks(crops)


class Engine:
    def __init__(self, settings: EngineSettings, worker_settings: WorkerSettings, *,
                 directory: WorkerDirectory | None = None, prefix: str | None = None):
        self.settings = settings
        self.worker_settings = worker_settings
        if directory is None and settings.redis:  # workers registered in Redis (gpen-stream worker --redis)
            from configs.keys import Keys
            from streamer.discovery import RedisDirectory
            from streamer.serve.connection import connect

            directory = RedisDirectory(connect(settings.redis), Keys(prefix or settings.prefix),
                                       start_timeout_s=settings.connect_timeout_s)
        self.directory = directory  # else: connect, or our own workers
        self.context = zmq.Context()
        self.link_options: dict = {}
        if settings.keys_dir is not None:
            from workers.security import ClientKeys

            self.link_options["socket_options"] = ClientKeys(settings.keys_dir).apply
        self._lock = threading.Lock()
        self._detectors: dict[str, SharedDetector] = {}
        self._parser: SharedParser | None = None
        self._pools: dict[str, LocalWorkers] = {}
        self._closed = False

    # ------------------------------------------------------------------ shared resources

    def detector(self, name: str) -> SharedDetector:
        with self._lock:
            if name not in self._detectors:
                from streamer.faces.detect import FaceDetector, load_retinaface

                net = load_retinaface(name, self.detector_device, weights=self.settings.detector_weights)
                self._detectors[name] = SharedDetector(FaceDetector(net))
                metrics.MODEL_LOADS.labels(kind="detector").inc()
            return self._detectors[name]

    def parser(self) -> SharedParser:
        with self._lock:
            if self._parser is None:
                from streamer.faces.parse import FaceParser

                self._parser = SharedParser(FaceParser(self.detector_device, weights=self.settings.parser_weights))
                metrics.MODEL_LOADS.labels(kind="parser").inc()
            return self._parser

    @property
    def detector_device(self):
        return resolve_device(self.settings.detector_device)

    def crop_size(self, model: str) -> int:
        return crop_size(model, self.worker_settings.models.get(model))

    def check_model(self, model: str) -> None:
        """Fail before any slow work when the model cannot be served: unknown name, or its
        weights missing here (fetched and verified now, when our own workers will load it)."""
        self.crop_size(model)
        if needs_weights(model) and self.directory is None and not self.settings.connect \
                and model not in self.worker_settings.models:
            from gpen.weights import ensure

            ensure(model)

    def workers_for(self, model: str) -> WorkerDirectory:
        """Where the workers serving ``model`` are; our own are started on first use."""
        if self.directory is not None:
            return self.directory.for_model(model)
        if self.settings.connect:
            return StaticDirectory([WorkerEndpoint(e, self.settings.connect_timeout_s) for e in self.settings.connect])
        with self._lock:
            if self._closed:
                raise RuntimeError("the engine is closed")
            pool = self._pools.get(model)
            if pool is None:
                pool = start_local_workers(model, self.worker_settings, count=self.settings.workers,
                                           isolate=self.settings.isolate_workers, context=self.context)
                self._pools[model] = pool
        timeout = self.settings.worker_start_timeout_s
        return StaticDirectory([WorkerEndpoint(w.endpoint, timeout, w.is_alive, w.describe) for w in pool.workers])

    def worker_count(self) -> int:
        """Workers usable now (for health checks and metrics)."""
        if self.directory is not None:
            count = len(self.directory.endpoints())
        elif self.settings.connect:
            count = len(self.settings.connect)
        else:
            with self._lock:
                count = sum(w.is_alive() for pool in self._pools.values() for w in pool.workers)
        metrics.WORKERS.set(count)
        return count

    def can_serve(self, model: str) -> bool:
        """Whether some worker can take ``model`` now: with workers found in Redis, one that
        registered it; our own workers are started on demand; --connect workers are trusted."""
        return self.directory is None or self.directory.for_model(model).endpoints() != []

    def workers_ok(self) -> bool:
        """False when a worker this process started has died."""
        with self._lock:
            return all(w.is_alive() for pool in self._pools.values() for w in pool.workers)

    # ------------------------------------------------------------------ jobs

    def run(self, source, sink, options: JobOptions, *, policy: JobPolicy = FILE_POLICY, faces_by_frame=None,
            dump=None, progress=None, cancel: threading.Event | None = None, job_id: str | None = None,
            max_in_flight: int | None = None):
        """Run one job: frames from ``source``, restored, into ``sink`` (committed on success,
        aborted on failure or cancel). Returns a ``pipeline.JobResult``."""
        from streamer.pipeline import run_job

        return run_job(self, source, sink, options, policy=policy, faces_by_frame=faces_by_frame, dump=dump,
                       progress=progress, cancel=cancel, job_id=job_id, max_in_flight=max_in_flight)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            pools, self._pools = list(self._pools.values()), {}
        for pool in pools:
            pool.stop()
        self.context.destroy(linger=0)

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def worker_weights(worker: WorkerSettings, model: str, weights: Path | None) -> WorkerSettings:
    """``worker`` with ``weights`` as the checkpoint for ``model`` (restore --weights)."""
    if weights is None:
        return worker
    return worker.model_copy(update={"models": {**worker.models, model: Path(weights)}})
