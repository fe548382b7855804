"""Every Redis key gpen-stream uses, in one place (daemons, clients and workers share it). The prefix (``serve.prefix``, default
``gpen``) lets two deployments share one Redis.

    <p>:jobs              stream   submitted jobs (XADD); consumer group <p>
    <p>:jobs:dead         stream   jobs that failed every delivery (max_attempts)
    <p>:job:<id>          hash     one job's state (expires keep_finished_s after it ends)
    <p>:jobs:recent       zset     job ids by submission time (for `gpen-stream jobs`)
    <p>:events            stream   state changes and progress (capped)
    <p>:daemon:<id>       hash     a serve daemon's heartbeat (TTL)
    <p>:feed:<id>:owner   string   the daemon that runs a serve.streams feed (TTL, renewed)
    <p>:worker:<id>       hash     a worker's registration (TTL, refreshed by heartbeat)
    <p>:gpu:<host>:<n>    hash     a GPU's memory budget and its leases
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Keys:
    prefix: str = "gpen"

    @property
    def jobs(self) -> str:
        return f"{self.prefix}:jobs"

    @property
    def group(self) -> str:
        return self.prefix

    @property
    def dead(self) -> str:
        return f"{self.prefix}:jobs:dead"

    def job(self, job_id: str) -> str:
        return f"{self.prefix}:job:{job_id}"

    @property
    def recent(self) -> str:
        return f"{self.prefix}:jobs:recent"

    @property
    def events(self) -> str:
        return f"{self.prefix}:events"

    def daemon(self, daemon_id: str) -> str:
        return f"{self.prefix}:daemon:{daemon_id}"

    def feed_owner(self, feed_id: str) -> str:
        return f"{self.prefix}:feed:{feed_id}:owner"

    def worker(self, worker_id: str) -> str:
        return f"{self.prefix}:worker:{worker_id}"

    @property
    def workers_pattern(self) -> str:
        return f"{self.prefix}:worker:*"

    def gpu(self, host: str, index: int | str) -> str:
        return f"{self.prefix}:gpu:{host}:{index}"
