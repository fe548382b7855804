"""``gpen-stream serve``: runs the jobs other services put in Redis, on one long-lived engine.

One loop takes jobs; each job runs in its own thread on the shared engine (its workers and
loaded models serve every job: a job does not pay model loading). The loop, once a second:
keeps its running entries claimed, looks for cancel requests, takes over entries that a dead
daemon left pending, refreshes its heartbeat and the queue gauges.

Exactly once: a job is acknowledged only after its output was renamed into place and its
state says done (or after it failed for a reason retrying cannot fix). A daemon killed in
the middle leaves the entry pending; another daemon takes it over after ``claim_idle_s``
and runs it again from the start, writing to a temporary file of its own attempt and removing
what earlier attempts left, so one output appears, once, and no temporary file is left. A
daemon that stalled past ``claim_idle_s`` and finds its job taken over stops it without
writing anything (``JobStore.update_if``). An entry that failed ``max_attempts`` times goes to
``<prefix>:jobs:dead``.

Redis going away does not stop running jobs: their state writes queue up in order
(``RedisWriter``) and reach Redis when it is back; the loop retries with backoff. SIGTERM:
take no more jobs, let the running file jobs finish within ``drain_s`` (they stay claimed
meanwhile, and a cancel sent meanwhile is a cancel), stop live ones at once (they never
finish), put the others back to queued (still pending, for another daemon, the attempt not
counted), let this daemon's serve.streams feeds go to another daemon, exit 0.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import redis as redis_lib

from configs import JobOptions, LiveSettings, ServeSettings, load_settings
from configs.atomic import attempt_tag, tagged_parts
from configs.errors import Cancelled, GpenStreamError
from streamer import logs
from streamer.logs import redact_text
from streamer.engine import Engine
from streamer.jobs.live import NETWORK_SCHEMES, LiveStream, run_live
from streamer.jobs.restore import restore_file
from streamer.pipeline import Progress
from streamer.serve.connection import REDIS_ERRORS, connect, redact, transient
from configs.keys import Keys
from streamer.serve.queue import JobQueue
from streamer.serve.spec import JobRejected, JobSpec, decode_fields, job_id_of, parse_job, resolve_under
from streamer.serve.state import FINISHED, JobState, JobStore, utc_now
from workers import metrics

log = logging.getLogger(__name__)

LOOP_S = 1.0  # housekeeping period of the main loop
ANY_STREAM = [f"{scheme}://*" for scheme in NETWORK_SCHEMES]  # serve.streams: the operator's own feeds
CANCEL_POLL_S = 0.5  # a running job sees a cancel request within this (plus one progress tick)
PROGRESS_EVERY_S = 1.0  # at most one progress event per job per second
DAEMON_TTL_S = 15


class RedisWriter:
    """Writes that must reach Redis in order, whether or not it is up right now: job state
    changes, acknowledgements, progress (only the latest per job is kept while waiting)."""

    def __init__(self):
        self._ops: deque = deque()
        self._progress: dict[str, object] = {}
        self._cv = threading.Condition()
        self._stop = False
        self.down_since: float | None = None
        self._thread = threading.Thread(target=self._loop, name="redis-writer", daemon=True)
        self._thread.start()

    def put(self, op) -> None:
        with self._cv:
            self._ops.append(op)
            self._cv.notify()

    def put_progress(self, job_id: str, op) -> None:
        with self._cv:
            self._progress[job_id] = op
            self._cv.notify()

    def drop_progress(self, job_id: str) -> None:
        with self._cv:
            self._progress.pop(job_id, None)

    def idle(self) -> bool:
        with self._cv:
            return not self._ops and not self._progress

    def close(self, timeout_s: float) -> bool:
        """Stop after flushing what is queued (for at most ``timeout_s``); True if flushed."""
        deadline = time.monotonic() + timeout_s
        while not self.idle() and time.monotonic() < deadline:
            time.sleep(0.05)
        with self._cv:
            self._stop = True
            self._cv.notify()
        return self.idle()

    def _loop(self) -> None:
        backoff = 0.2
        while True:
            with self._cv:
                while not self._ops and not self._progress and not self._stop:
                    self._cv.wait(1.0)
                if self._stop:
                    return
                op = self._ops[0] if self._ops else None
                job_id = None
                if op is None:
                    job_id, op = next(iter(self._progress.items()))
            try:
                op()
            except Exception as exc:
                if transient(exc):  # away, or refusing writes for now (OOM, READONLY, ...): wait for it
                    if self.down_since is None:
                        self.down_since = time.monotonic()
                        log.warning("Redis unreachable or refusing writes (%s); state updates wait for it", exc)
                    time.sleep(backoff)
                    backoff = min(backoff * 2, 5.0)
                    continue
                log.exception("a Redis update failed")  # a bad write must not stop the others
            if self.down_since is not None:
                log.info("Redis is back after %.0f s", time.monotonic() - self.down_since)
                self.down_since = None
            backoff = 0.2
            with self._cv:
                if job_id is None:
                    self._ops.popleft()
                elif self._progress.get(job_id) is op:
                    del self._progress[job_id]


@dataclass
class _Waiting:
    """A job taken from the queue that no registered worker serves yet: kept claimed by this
    daemon, started as soon as one does, cancelled at once if asked."""

    job_id: str
    raw: dict
    model: str
    output: str | None


@dataclass
class _Running:
    spec: JobSpec
    fields: dict
    from_config: bool = False  # a stream of serve.streams: no queue entry behind it
    attempt: int = 1  # the job's attempts count with this run
    cancel: threading.Event = field(default_factory=threading.Event)
    user_cancelled: bool = False
    lost: bool = False  # another daemon took the entry over: this run writes nothing more
    started: float = field(default_factory=time.monotonic)
    last_progress: float = 0.0
    thread: threading.Thread | None = None


class Daemon:
    def __init__(self, settings: ServeSettings, engine: Engine, defaults: JobOptions, *,
                 daemon_id: str | None = None, client=None, live: LiveSettings | None = None):
        self.settings, self.engine, self.defaults = settings, engine, defaults
        self.live = live or load_settings(LiveSettings)
        self.id = daemon_id or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:4]}"
        self.keys = Keys(settings.prefix)
        self.redis = client or connect(settings.redis)
        self.store = JobStore(self.redis, self.keys, events_maxlen=settings.events_maxlen,
                              keep_finished_s=settings.keep_finished_s)
        self.queue = JobQueue(self.redis, self.keys, self.id)
        self.writer = RedisWriter()
        self.running: dict[str, _Running] = {}  # by entry id
        self.finishing: set[str] = set()  # entries of finished jobs whose final write waits in the writer
        self.waiting: dict[str, _Waiting] = {}  # by entry id: jobs no registered worker serves yet (--farm)
        self._lock = threading.Lock()
        self.draining = False
        self.redis_ok = True
        self.runs = 0  # jobs started by this daemon (for tests and /healthz)
        self._slot_freed = threading.Event()
        self.feeds = self._parse_config_streams()  # serve.streams, by id
        self._feeds_started: set[str] = set()  # a feed that ended here (cancelled, failed) is not started again

    # ------------------------------------------------------------------ the loop

    def serve(self, stop: threading.Event) -> None:
        """Until ``stop`` is set; then drain (see the module docstring) and return."""
        log.info("daemon %s serving %s on %s (concurrency %d)", self.id, self.keys.jobs, redact(self.settings.redis),
                 self.settings.concurrency)
        last_housekeeping = 0.0
        backoff = 0.5
        need_group = True
        while not stop.is_set():
            try:
                if need_group:
                    self.queue.ensure_group()
                    need_group = False
                now = time.monotonic()
                if now - last_housekeeping >= LOOP_S:
                    last_housekeeping = now
                    self._housekeeping()
                self._poll_cancels()
                free = self.settings.concurrency - self._busy()
                if free > 0:
                    for entry, fields in self.queue.read(free, block_ms=int(CANCEL_POLL_S * 1000)):
                        self._take(entry, fields)
                else:
                    self._slot_freed.wait(CANCEL_POLL_S)  # a finishing job wakes us at once
                    self._slot_freed.clear()
                self._set_redis_ok(True)
                backoff = 0.5
            except (*REDIS_ERRORS, redis_lib.ResponseError) as exc:
                if "NOGROUP" in str(exc):  # Redis restarted without its data: start again
                    log.warning("the consumer group is gone (Redis lost its data?); creating it again")
                    need_group = True
                    continue
                # away, or refusing (OOM, READONLY, MISCONF, ...): the running jobs go on; retry
                self._set_redis_ok(False, exc)
                stop.wait(backoff)
                backoff = min(backoff * 2, 10.0)
            except Exception:  # a bug must not stop the jobs running here
                log.exception("unexpected error in the daemon loop; going on")
                stop.wait(backoff)
                backoff = min(backoff * 2, 10.0)
        self._drain()

    def _set_redis_ok(self, ok: bool, exc: Exception | None = None) -> None:
        if ok and not self.redis_ok:
            log.info("Redis is reachable again")
        elif not ok and self.redis_ok:
            log.warning("Redis unreachable or refusing commands (%s); running jobs go on, retrying", exc)
        self.redis_ok = ok

    def _housekeeping(self) -> None:
        with self._lock:
            entries = [entry for entry, run in self.running.items() if not run.from_config]
            entries += sorted(self.finishing)  # done here: not to be run again while Redis takes the news
        entries += list(self.waiting)
        for entry in self.queue.touch(entries):  # our running jobs are not stale, however long they take
            self._lost(entry)
        self._start_waiting()
        self._own_config_streams()
        self.redis.hset(self.keys.daemon(self.id), mapping={"running": len(entries), "updated": utc_now()})
        self.redis.expire(self.keys.daemon(self.id), DAEMON_TTL_S)
        free = self.settings.concurrency - self._busy()
        if free > 0:
            for entry, fields in self.queue.claim_stale(free, self.settings.claim_idle_s):
                if entry not in self.running and entry not in self.finishing:
                    log.info("taking over job entry %s (its daemon stopped refreshing it)", entry)
                    self._take(entry, fields)
        counts = self.queue.counts()
        for name, value in counts.items():
            metrics.JOB_QUEUE.labels(kind=name).set(value)

    def _start_waiting(self) -> None:
        """Start the waiting jobs whose model some worker now serves, while slots are free."""
        for entry, waiting in list(self.waiting.items()):
            if self.settings.concurrency - self._busy() <= 0:
                return
            if self.engine.can_serve(waiting.model):
                del self.waiting[entry]
                self._take(entry, waiting.raw)

    def _lost(self, entry: str) -> None:
        """Another daemon took ``entry`` over (this one stalled past claim_idle_s): it runs the
        job now; ours stops without writing anything."""
        if self.waiting.pop(entry, None) is not None:
            return
        with self._lock:
            run = self.running.get(entry)
        if run is not None and not run.lost:
            log.warning("job entry %s was taken over by another daemon (this one stalled); stopping our run",
                        entry, extra={"job": run.spec.id})
            run.lost = True
            run.cancel.set()

    def _busy(self) -> int:
        """Slots in use: queued jobs only (the streams of serve.streams run besides them)."""
        with self._lock:
            return sum(not run.from_config for run in self.running.values())

    def _poll_cancels(self) -> None:
        with self._lock:
            by_job = {run.spec.id: run for run in self.running.values()}
        waiting = {w.job_id: entry for entry, w in self.waiting.items()}
        for job_id in self.store.cancel_requested([*by_job, *waiting]):
            if job_id in waiting:  # not started: it ends here and now
                log.info("cancel requested", extra={"job": job_id})
                w = self.waiting.pop(waiting[job_id])
                self._finish_now(job_id, waiting[job_id], JobState.CANCELLED, "", output=w.output)
                continue
            run = by_job[job_id]
            if not run.cancel.is_set():
                log.info("cancel requested", extra={"job": job_id})
                run.user_cancelled = True
                run.cancel.set()

    # ------------------------------------------------------------------ one entry

    def _take(self, entry: str, raw: dict) -> None:
        """Handle one entry. Whatever is wrong with it fails that job, never the daemon; Redis
        trouble goes to the loop (the entry stays pending and is taken up again)."""
        self.waiting.pop(entry, None)
        try:
            self._take_entry(entry, raw)
        except (*REDIS_ERRORS, redis_lib.ResponseError):
            raise
        except Exception as exc:  # an entry nobody foresaw (or a bug): this job fails, the others go on
            log.exception("job entry %s could not be handled; failing its job", entry)
            self._fail_entry(entry, raw, f"the job could not be read: {type(exc).__name__}: {str(exc)[:200]}")

    def _fail_entry(self, entry: str, raw: dict, error: str) -> None:
        try:
            job_id = job_id_of(decode_fields(raw), entry)
        except Exception:  # not even an id: record it under one made from the entry
            job_id = f"entry-{entry}"
        found = self.store.register(job_id, entry, {})
        if found is not None and found[1] != entry:  # the id is another entry's job: this one is dropped
            log.error("job entry %s (id %s) could not be read, and the id belongs to entry %s; dropping it",
                      entry, job_id, found[1])
            self.queue.ack(entry)
            return
        self._finish_now(job_id, entry, JobState.FAILED, error)

    def _take_entry(self, entry: str, raw: dict) -> None:
        try:
            fields = decode_fields(raw)
            job_id = job_id_of(fields, entry)
        except JobRejected as exc:  # not even an id: record it under one made from the entry
            job_id = f"entry-{entry}"
            self.store.register(job_id, entry, {})
            self._finish_now(job_id, entry, JobState.FAILED, str(exc))
            return
        found = self.store.register(job_id, entry, {k: fields[k] for k in ("input", "output", "model") if k in fields})
        if found is not None:
            state, owner = found
            if owner and owner != entry:
                log.info("entry %s repeats job id %s (submitted as entry %s): nothing to run", entry, job_id, owner)
                self.queue.ack(entry)
                return
            if state in FINISHED:  # finished, but the acknowledgement was lost (a crash in between)
                self.queue.ack(entry)
                return
        current = self.store.get(job_id)
        if current.get("cancel") == "1":
            self._finish_now(job_id, entry, JobState.CANCELLED, "", output=current.get("output"))
            return
        attempts = int(current.get("attempts") or 0)
        if attempts >= self.settings.max_attempts:
            error = current.get("error") or "the job did not finish"
            message = f"gave up after {attempts} attempts: {error}"
            log.error("%s", message, extra={"job": job_id})
            self._finish_now(job_id, entry, JobState.FAILED, message, output=current.get("output"),
                             end=lambda p: self.queue.bury(entry, raw, message, pipe=p))
            metrics.JOBS.labels(state="dead").inc()
            return
        try:
            spec = parse_job(fields, entry, input_roots=self.settings.input_roots,
                             output_roots=self.settings.output_roots, defaults=self.defaults,
                             live_sources=self.settings.live_sources, live_outputs=self.settings.live_outputs)
        except JobRejected as exc:
            log.error("rejected: %s", exc, extra={"job": job_id})
            self._finish_now(job_id, entry, JobState.FAILED, str(exc), output=current.get("output"))
            return
        model = spec.options.model
        if not self.engine.can_serve(model):  # not acknowledged: it waits here for a worker
            if not _known_model(model, self.engine):
                self._finish_now(job_id, entry, JobState.FAILED, f"unknown model '{model}'; no worker serves it, "
                                 f"and it is none of {', '.join(_model_names(self.engine))}")
                return
            reason = f"waiting: no registered worker serves {model}"
            if current.get("error") != reason:
                log.info("%s", reason, extra={"job": job_id})
                self.store.update_if(job_id, {"state": JobState.QUEUED.value, "error": reason})
            self.waiting[entry] = _Waiting(job_id, raw, model, current.get("output"))
            return
        self._start(spec, raw, attempts + 1)

    def _finish_now(self, job_id: str, entry: str, state: JobState, error: str, *, output: str | None = None,
                    end=None) -> None:
        """End a job this daemon just took, without running it: its state (unless it finished
        meanwhile), its entry acknowledged (``end(pipe)``: or buried), what attempts before
        left beside its output removed."""
        values = {"state": state.value, "error": redact_text(error), "finished": utc_now(), "daemon": self.id}
        end = end or (lambda p: self.queue.ack(entry, pipe=p))
        if not self.store.update_if(job_id, values, finished=True, also=end):
            self.queue.ack(entry)  # it finished elsewhere meanwhile: that state stays
        if output:
            self._remove_parts(job_id, output)
        metrics.JOBS.labels(state=state.value).inc()

    def _remove_parts(self, job_id: str, output: str | Path) -> None:
        """Remove the temporary files earlier attempts at ``job_id`` left beside ``output``
        (resolved again under the output roots: a hash field is no licence to delete)."""
        try:
            dest = resolve_under(str(output), self.settings.output_roots, "output", must_exist=False)
        except JobRejected:
            return  # a stream URL, or not (or no longer) under the roots
        for part in tagged_parts(dest, job_id):
            try:
                part.unlink(missing_ok=True)
                log.info("removed %s, left by an earlier attempt", part.name, extra={"job": job_id})
            except OSError as exc:
                log.warning("cannot remove %s: %s", part, exc, extra={"job": job_id})

    def _parse_config_streams(self) -> dict[str, JobSpec]:
        """The live feeds listed in serve.streams, checked once (a bad one is said and left out)."""
        feeds = {}
        for item in self.settings.streams:
            fields = {k: (json.dumps(v) if k == "options" else str(v)) for k, v in item.items()}
            entry = f"config:{fields.get('id', '')}"
            try:
                spec = parse_job(fields, entry, input_roots=self.settings.input_roots,
                                 output_roots=self.settings.output_roots, defaults=self.defaults,
                                 live_sources=ANY_STREAM, live_outputs=ANY_STREAM)  # the operator's own
                if not spec.live:
                    raise JobRejected("serve.streams lists live feeds; give an rtsp://, rtmp://, srt:// or udp:// input")
            except JobRejected as exc:
                log.error("serve.streams entry %s: %s", item.get("id", "?"), exc)
                continue
            feeds[spec.id] = spec
        return feeds

    def _own_config_streams(self) -> None:
        """The serve.streams feeds run while daemons run (like cameras), each at one daemon
        however many share the config: the one holding its owner key (DAEMON_TTL_S, renewed
        here). A daemon that dies lets its feeds go at the key's expiry, one that stops at once.
        A feed that ended here (cancelled, or failed for good) stays ended, and owned, until
        this daemon stops, as a job would."""
        for feed_id, spec in self.feeds.items():
            with self._lock:
                run = self.running.get(spec.entry)
            if not self.store.own_feed(feed_id, self.id, DAEMON_TTL_S):
                if run is not None and not run.lost:  # our key lapsed (Redis away) and another daemon took it
                    log.warning("feed %s is run by another daemon now; stopping it here", feed_id,
                                extra={"job": feed_id})
                    run.lost = True
                    run.cancel.set()
                continue
            if feed_id not in self._feeds_started:
                self.store.register(spec.id, spec.entry, {"input": spec.input, "output": str(spec.output),
                                                          "model": spec.options.model})
                self.redis.hdel(self.keys.job(spec.id), "cancel")
                self._start(spec, {}, 1, from_config=True)
                self._feeds_started.add(feed_id)

    def _release_config_streams(self) -> None:
        for feed_id in self.feeds:
            try:
                self.store.release_feed(feed_id, self.id)
            except (*REDIS_ERRORS, redis_lib.ResponseError):
                pass  # it expires

    def _start(self, spec: JobSpec, raw: dict, attempt: int, *, from_config: bool = False) -> None:
        """Say "running", then run. Redis refusing the first write leaves nothing behind (no
        slot held, no entry kept claimed): the entry stays pending and is taken up again."""
        run = _Running(spec, raw, from_config=from_config, attempt=attempt)
        values = {"state": JobState.RUNNING.value, "attempts": attempt, "daemon": self.id, "started": utc_now(),
                  "error": "", "progress": 0}
        if from_config:  # a feed of the config: runs again whatever an earlier run ended in
            self.store.update(spec.id, values, persist=True)
        elif not self.store.update_if(spec.id, values):  # finished meanwhile (by a daemon that stalled)
            self.queue.ack(spec.entry)
            return
        if not spec.live:
            self._remove_parts(spec.id, spec.output)
        run.thread = threading.Thread(target=self._run_job, args=(run,), name=f"job-{spec.id}", daemon=True)
        with self._lock:
            self.running[spec.entry] = run
            self.runs += 1
            metrics.JOBS_RUNNING.set(len(self.running))
        try:
            run.thread.start()
        except BaseException:
            with self._lock:
                self.running.pop(spec.entry, None)
            raise

    def _run_job(self, run: _Running) -> None:
        spec = run.spec
        token = logs.JOB.set(spec.id)
        try:
            log.info("running %s -> %s (%s%s)", spec.input, spec.output, spec.options.model, ", live" if spec.live else "")
            try:
                if spec.live:
                    result = run_live(self.engine, LiveStream(spec.input, (str(spec.output),)), spec.options,
                                      self.live, cancel=run.cancel, progress=lambda p: self._progress(run, p),
                                      job_id=spec.id)
                else:
                    result = restore_file(spec.input, spec.output, spec.options, engine=self.engine,
                                          faces_file=spec.faces, progress=lambda p: self._progress(run, p),
                                          cancel=run.cancel, job_id=spec.id,
                                          temp_tag=attempt_tag(spec.id, run.attempt))
            except Cancelled:
                if run.lost:
                    log.info("stopped: another daemon runs the job now")
                elif run.user_cancelled:
                    self._finish(run, JobState.CANCELLED, error="cancelled")
                else:  # the daemon is stopping: leave it pending for another daemon, no attempt spent
                    self._requeue(run, "the daemon stopped before the job finished; it will run again",
                                  failed=False)
            except GpenStreamError as exc:
                if exc.retryable:
                    self._requeue(run, str(exc))
                else:
                    self._finish(run, JobState.FAILED, error=str(exc))
            except Exception as exc:  # unforeseen: worth another attempt, up to max_attempts
                log.exception("job failed unexpectedly")
                self._requeue(run, f"{type(exc).__name__}: {exc}")
            else:
                self._finish(run, JobState.DONE, output=str(result.output), frames=result.frames)
                log.info("done: %d frames, %d faces in %.1f s", result.frames, result.faces, result.elapsed_s)
        finally:
            metrics.JOB_SECONDS.observe(time.monotonic() - run.started)
            with self._lock:
                self.running.pop(spec.entry, None)
                metrics.JOBS_RUNNING.set(len(self.running))
            self._slot_freed.set()
            logs.JOB.reset(token)

    def _progress(self, run: _Running, p: Progress) -> None:
        now = time.monotonic()
        if now - run.last_progress < PROGRESS_EVERY_S:
            return
        run.last_progress = now
        fields = {"progress": round(p.fraction, 4) if p.fraction is not None else "",
                  "frames_done": p.frames_done, "frames_total": p.frames_total, "fps": round(p.fps, 2),
                  "eta_s": round(p.eta_s, 1) if p.eta_s is not None else ""}
        if p.live is not None:  # live jobs: their figures, in the hash and as metrics
            fields |= {k: ("" if p.live.get(k) is None else p.live[k]) for k in metrics.LIVE_FIGURES}
            metrics.publish_live(run.spec.id, p.live)
        self.writer.put_progress(run.spec.id, lambda: self._write(run, fields))

    def _finish(self, run: _Running, state: JobState, *, error: str = "", output: str = "", frames: int = 0) -> None:
        """Write the final state, then acknowledge: in that order, through the writer (Redis
        may be down right now; the job is done either way)."""
        spec = run.spec
        values = {"state": state.value, "error": redact_text(error), "finished": utc_now()}
        if state is JobState.DONE:
            values |= {"output": output, "progress": 1, "frames_done": frames, "eta_s": 0}
        self.writer.drop_progress(spec.id)

        def write() -> None:
            try:
                self._write(run, values, finished=True,
                            also=None if run.from_config else lambda p: self.queue.ack(spec.entry, pipe=p))
            except Exception as exc:
                if transient(exc):
                    raise  # the writer tries again
                with self._lock:  # dropped: the entry goes stale and runs again elsewhere
                    self.finishing.discard(spec.entry)
                raise
            with self._lock:
                self.finishing.discard(spec.entry)

        if not run.from_config:
            with self._lock:
                self.finishing.add(spec.entry)
        self.writer.put(write)
        metrics.JOBS.labels(state=state.value).inc()

    def _requeue(self, run: _Running, error: str, *, failed: bool = True) -> None:
        """Not acknowledged: the entry stays pending and is taken over after claim_idle_s.
        ``failed=False`` (the daemon stopped under it): the attempt is given back, so restarts
        (deploys, scale-down) never bury a healthy job, nor a live one that never ends."""
        log.warning("will be retried: %s", error)
        values = {"state": JobState.QUEUED.value, "error": redact_text(error)}
        if not failed:
            values["attempts"] = run.attempt - 1
        self.writer.drop_progress(run.spec.id)
        self.writer.put(lambda: self._write(run, values))
        metrics.JOBS.labels(state="retried").inc()

    def _write(self, run: _Running, values: dict, *, finished: bool = False, also=None) -> None:
        """A state change of ``run``'s, only while the job is still this run's (see
        ``JobStore.update_if``); a run that lost its job writes nothing."""
        if run.lost:
            return
        if run.from_config:  # a feed of this daemon's config: no entry, nobody takes it over
            p = self.redis.pipeline(transaction=True)
            self.store.update(run.spec.id, values, finished=finished, pipe=p)
            if also is not None:
                also(p)
            p.execute()
        elif not self.store.update_if(run.spec.id, values, owner=(self.id, run.attempt), finished=finished,
                                      also=also, recreate=self._identity(run)):
            log.warning("the job is no longer this run's (another daemon took it over, or it ended); "
                        "stopping, its state left as it is", extra={"job": run.spec.id})
            run.lost = True
            run.cancel.set()

    def _identity(self, run: _Running) -> dict:
        """What a running job's hash says of it, to write again if Redis lost it."""
        spec = run.spec
        return {"state": JobState.RUNNING.value, "entry": spec.entry, "input": spec.input, "output": str(spec.output),
                "model": spec.options.model, "daemon": self.id, "attempts": run.attempt, "started": utc_now()}

    # ------------------------------------------------------------------ stopping

    def _drain(self) -> None:
        with self._lock:
            runs = list(self.running.values())
        if runs:
            log.info("stopping: %d running job(s) get %.0f s to finish", len(runs), self.settings.drain_s)
        deadline = time.monotonic() + self.settings.drain_s
        runs = [run for run in runs if run.thread is not None and run.thread.ident is not None]  # started ones
        for run in runs:
            if run.spec.live:  # a live job never finishes: waiting drain_s for it only delays its next daemon
                run.cancel.set()
        while time.monotonic() < deadline and any(run.thread.is_alive() for run in runs):
            next(run for run in runs if run.thread.is_alive()).thread.join(
                min(1.0, max(0.0, deadline - time.monotonic())))
            try:
                self._poll_cancels()  # a cancel sent while draining is a cancel, not a requeue
                entries = [run.spec.entry for run in runs if run.thread.is_alive() and not run.from_config]
                for entry in self.queue.touch(entries):  # still ours while they finish (drain_s may pass claim_idle_s)
                    self._lost(entry)
            except (*REDIS_ERRORS, redis_lib.ResponseError):
                pass
        for run in runs:
            if run.thread.is_alive():
                run.cancel.set()  # not user_cancelled: it goes back to queued, still pending
        for run in runs:
            run.thread.join(60)
        self._release_config_streams()  # another daemon takes our feeds up at once
        if not self.writer.close(timeout_s=max(5.0, self.settings.drain_s)):
            log.warning("Redis did not take the last state updates; other daemons will redo what is pending")
        try:
            self.redis.delete(self.keys.daemon(self.id))
        except (*REDIS_ERRORS, redis_lib.ResponseError):
            pass
        log.info("daemon %s stopped", self.id)

    def health(self) -> dict:
        try:
            self.redis.ping()
            redis_ok = True
        except (*REDIS_ERRORS, redis_lib.ResponseError):
            redis_ok = False
        workers = self.engine.worker_count()
        return {"ok": redis_ok and self.engine.workers_ok(), "redis": redis_ok, "workers": workers,
                "running": len(self.running), "daemon": self.id}


def _model_names(engine: Engine) -> list[str]:
    from workers.restorers import GPEN_SIZES, IDENTITY

    return [*GPEN_SIZES, IDENTITY, *engine.worker_settings.models]


def _known_model(model: str, engine: Engine) -> bool:
    """Whether some worker could ever serve ``model``: a released GPEN, a diagnostic model, or
    one the settings give weights for (a name no worker knows would wait for ever)."""
    from workers.restorers import STANDIN

    return model in _model_names(engine) or STANDIN.match(model) is not None
