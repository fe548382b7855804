"""Job state in Redis: the ``<prefix>:job:<id>`` hash and the ``<prefix>:events`` stream.

Hash fields (all strings; times ISO 8601 UTC):

    state        queued | running | done | failed | cancelled
    progress     0..1          frames_done, frames_total, fps, eta_s   (while running)
    error        why it failed (or why it went back to queued)
    output       the written file, once done
    input, model what was asked
    attempts     how many times a daemon started it
    daemon       the daemon running it (or that ran it last)
    created, started, finished, updated
    entry        the stream entry that carried it (a second entry with the same id is a duplicate)
    cancel       set to 1 by a client to cancel it

A finished job's hash expires ``keep_finished_s`` after it ends. Every state change, and at
most one progress update per job per second, is also an entry of ``<prefix>:events``
(fields ``id``, ``state``, ``time`` and the progress fields), capped at about
``events_maxlen`` entries.
"""

from __future__ import annotations

import time
from datetime import datetime, timezone
from enum import Enum

from configs.keys import Keys


class JobState(str, Enum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


FINISHED = {JobState.DONE.value, JobState.FAILED.value, JobState.CANCELLED.value}
PROGRESS_FIELDS = ("progress", "frames_done", "frames_total", "fps", "eta_s")

# Register a job the first time a daemon sees its entry; say what is there if it exists.
# KEYS: job hash, recent zset. ARGV: job id, entry id, created (ISO), created (ms), field/value pairs.
# A hash holding only "cancel" (cancelled before any daemon saw it) counts as new, and keeps it.
REGISTER_LUA = """
local state = redis.call('HGET', KEYS[1], 'state')
if state then
  return {state, redis.call('HGET', KEYS[1], 'entry') or ''}
end
redis.call('HSET', KEYS[1], 'state', 'queued', 'entry', ARGV[2], 'created', ARGV[3], 'updated', ARGV[3],
           'progress', '0', 'attempts', '0', unpack(ARGV, 5))
redis.call('ZADD', KEYS[2], ARGV[4], ARGV[1])
redis.call('ZREMRANGEBYRANK', KEYS[2], 0, -10001)
return false
"""


# Hold a serve.streams feed (one daemon runs it, however many share the config): take the
# owner key if free, or extend it if ours. KEYS: owner key. ARGV: daemon id, ttl ms. 1 if ours.
OWN_FEED_LUA = """
local owner = redis.call('GET', KEYS[1])
if owner and owner ~= ARGV[1] then
  return 0
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
"""

# Let a feed go (this daemon stops): delete the owner key if it is ours. KEYS: owner key. ARGV: daemon id.
RELEASE_FEED_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class JobStore:
    """Reads and writes job hashes and events (no retries here: see ``daemon.RedisWriter``)."""

    def __init__(self, redis, keys: Keys, *, events_maxlen: int = 100000, keep_finished_s: int = 604800):
        self.redis, self.keys = redis, keys
        self.events_maxlen, self.keep_finished_s = events_maxlen, keep_finished_s
        self._register = redis.register_script(REGISTER_LUA)
        self._own_feed = redis.register_script(OWN_FEED_LUA)
        self._release_feed = redis.register_script(RELEASE_FEED_LUA)

    def own_feed(self, feed_id: str, daemon_id: str, ttl_s: float) -> bool:
        """Take or keep a serve.streams feed for ``daemon_id``; False if another daemon runs it."""
        return bool(self._own_feed(keys=[self.keys.feed_owner(feed_id)], args=[daemon_id, int(ttl_s * 1000)]))

    def release_feed(self, feed_id: str, daemon_id: str) -> None:
        self._release_feed(keys=[self.keys.feed_owner(feed_id)], args=[daemon_id])

    def register(self, job_id: str, entry: str, fields: dict[str, str]) -> tuple[str, str] | None:
        """Create the job as queued; if it exists, return its (state, entry) instead."""
        now = utc_now()
        flat = [x for kv in fields.items() for x in kv]
        found = self._register(keys=[self.keys.job(job_id), self.keys.recent],
                               args=[job_id, entry, now, int(time.time() * 1000), *flat])
        if not found:
            return None
        return text(found[0]), text(found[1])

    def get(self, job_id: str) -> dict[str, str]:
        return {text(k): text(v) for k, v in self.redis.hgetall(self.keys.job(job_id)).items()}

    def update(self, job_id: str, fields: dict, *, event: bool = True, finished: bool = False, persist: bool = False,
               pipe=None) -> None:
        """Set ``fields`` (and ``updated``); add an event; start the expiry clock if finished
        (``persist``: stop one an earlier end started)."""
        now = utc_now()
        values = {k: "" if v is None else str(v) for k, v in fields.items()} | {"updated": now}
        p = pipe or self.redis.pipeline(transaction=True)
        p.hset(self.keys.job(job_id), mapping=values)
        if finished:
            p.expire(self.keys.job(job_id), self.keep_finished_s)
        elif persist:
            p.persist(self.keys.job(job_id))
        if event:
            shown = {k: v for k, v in values.items() if k in ("state", "error", "output", *PROGRESS_FIELDS)}
            p.xadd(self.keys.events, {"id": job_id, "time": now, **shown}, maxlen=self.events_maxlen, approximate=True)
        if pipe is None:
            p.execute()

    def update_if(self, job_id: str, fields: dict, *, owner: tuple[str, int] | None = None, finished: bool = False,
                  also=None, recreate: dict | None = None) -> bool:
        """``update`` in one transaction, only if the job has not finished and, with ``owner``
        (daemon, attempt), only while its hash still names that daemon and attempt: a daemon
        that stalled past claim_idle_s and lost the job to another never overwrites what the
        other wrote, and nothing turns a done job back into queued. ``also(pipe)`` adds commands
        to the same transaction (the acknowledgement). A hash that is gone (Redis lost its data
        under a running job) is no takeover: it is written again from ``recreate`` and
        ``fields``. False when refused."""
        key = self.keys.job(job_id)

        def write(pipe) -> bool:
            daemon, attempts, state = (None if v is None else text(v)
                                       for v in pipe.hmget(key, "daemon", "attempts", "state"))
            gone = daemon is None and attempts is None and state is None
            if gone and recreate is not None:
                values = recreate | fields
            elif state in FINISHED or (owner is not None and (daemon, attempts) != (owner[0], str(owner[1]))):
                pipe.unwatch()
                return False
            else:
                values = fields
            pipe.multi()
            self.update(job_id, values, finished=finished, pipe=pipe)
            if also is not None:
                also(pipe)
            return True

        return self.redis.transaction(write, key, value_from_callable=True)

    def cancel_requested(self, job_ids: list[str]) -> set[str]:
        if not job_ids:
            return set()
        p = self.redis.pipeline(transaction=False)
        for job_id in job_ids:
            p.hget(self.keys.job(job_id), "cancel")
        return {job_id for job_id, flag in zip(job_ids, p.execute()) if flag is not None and text(flag) == "1"}
