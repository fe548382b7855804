"""Delivery of jobs with a Redis Streams consumer group: at least once, made exactly once by
idempotent job ids and atomic output renames.

- ``read``: new entries for this daemon (XREADGROUP ... >); they stay in the group's pending
  entries list (PEL) until acknowledged.
- ``touch``: a daemon keeps the entries it is running claimed (XCLAIM ... JUSTID resets their
  idle time), so a long job is never taken over while its daemon lives; but only those still
  its own (``TOUCH_LUA``): a daemon that stalled past ``claim_idle_s`` learns that another took
  its entry over, and stops, instead of stealing it back.
- ``claim_stale``: entries idle longer than ``claim_idle_s`` belong to a daemon that died (or
  to a job that failed in a way worth retrying): take them over (XAUTOCLAIM, following its
  cursor: one call looks at no more than 10 x COUNT pending entries, and the live ones ahead
  of a stale one must not hide it).
- ``ack``: only once the job's output is in place and its state says so, or it failed for a
  reason retrying cannot fix.
- ``bury``: after ``max_attempts`` deliveries a job goes to ``<prefix>:jobs:dead``.
"""

from __future__ import annotations

import redis as redis_lib

from configs.keys import Keys
from streamer.serve.state import text

CLAIM_CALLS = 16  # XAUTOCLAIM calls per claim_stale at most; the cursor carries on at the next

# Keep this consumer's entries claimed (idle time back to 0), only those pending at this
# consumer; report the ones pending at another consumer (taken over while this one stalled).
# Entries no longer pending (acknowledged) are left alone. KEYS: jobs stream. ARGV: group,
# consumer, entry ids. Returns the entries lost to another consumer.
TOUCH_LUA = """
local lost = {}
for i = 3, #ARGV do
  local found = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1)[1]
  if found then
    if found[2] == ARGV[2] then
      redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[i], 'JUSTID')
    else
      table.insert(lost, ARGV[i])
    end
  end
end
return lost
"""


class JobQueue:
    def __init__(self, redis, keys: Keys, consumer: str):
        self.redis, self.keys, self.consumer = redis, keys, consumer
        self._touch = redis.register_script(TOUCH_LUA)
        self._cursor = "0-0"  # where the scan for stale entries goes on

    def ensure_group(self) -> None:
        """Create the consumer group (and the stream) if absent; from the start of the stream,
        so jobs submitted before any daemon ever ran are not lost."""
        try:
            self.redis.xgroup_create(self.keys.jobs, self.keys.group, id="0", mkstream=True)
        except redis_lib.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def read(self, count: int, block_ms: int) -> list[tuple[str, dict]]:
        reply = self.redis.xreadgroup(self.keys.group, self.consumer, {self.keys.jobs: ">"}, count=count,
                                      block=block_ms)
        return [(text(entry), fields) for _stream, entries in reply or [] for entry, fields in entries]

    def claim_stale(self, count: int, min_idle_s: float) -> list[tuple[str, dict]]:
        """Entries idle longer than ``min_idle_s`` at any consumer, now ours. Entries whose data
        was trimmed away cannot run: they are acknowledged."""
        taken: list[tuple[str, dict]] = []
        for _ in range(CLAIM_CALLS):
            cursor, claimed, deleted = self.redis.xautoclaim(self.keys.jobs, self.keys.group, self.consumer,
                                                             min_idle_time=int(min_idle_s * 1000),
                                                             start_id=self._cursor, count=count - len(taken))[:3]
            self._cursor = text(cursor)
            gone = [text(e) for e in deleted or []] + [text(e) for e, fields in claimed if fields is None]
            if gone:
                self.redis.xack(self.keys.jobs, self.keys.group, *gone)
            taken += [(text(entry), fields) for entry, fields in claimed if fields is not None]
            if len(taken) >= count or self._cursor == "0-0":  # enough, or the whole list seen
                break
        return taken

    def touch(self, entries: list[str]) -> list[str]:
        """Reset the idle time of those of ``entries`` still ours; the ones another daemon took
        over."""
        if not entries:
            return []
        lost = self._touch(keys=[self.keys.jobs], args=[self.keys.group, self.consumer, *entries])
        return [text(e) for e in lost or []]

    def ack(self, entry: str, pipe=None) -> None:
        (pipe or self.redis).xack(self.keys.jobs, self.keys.group, entry)

    def bury(self, entry: str, fields: dict, error: str, pipe=None) -> None:
        p = pipe or self.redis.pipeline(transaction=True)
        p.xadd(self.keys.dead, {**{text(k): text(v) for k, v in fields.items()}, "entry": entry, "error": error})
        p.xack(self.keys.jobs, self.keys.group, entry)
        if pipe is None:
            p.execute()

    def counts(self) -> dict[str, int]:
        """Queue depth (not yet delivered), pending (delivered, not acknowledged), dead."""
        lag = 0
        for group in self.redis.xinfo_groups(self.keys.jobs):
            if text(group.get("name", b"")) == self.keys.group:
                lag = int(group.get("lag") or 0)
        pending = self.redis.xpending(self.keys.jobs, self.keys.group)
        return {"queued": lag, "pending": int(pending.get("pending", 0)), "dead": int(self.redis.xlen(self.keys.dead))}
