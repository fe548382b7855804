"""A small client for the job protocol, used by ``gpen-stream submit|status|cancel|watch|jobs``
and importable by other Python services. Any language can do the same with plain Redis
commands (README.md, "Jobs over Redis"):

    from streamer.serve.client import Client
    client = Client("redis://127.0.0.1:6379/0")
    job = client.submit("/media/in/a.mp4", "/media/out/a.mp4", options={"crf": 16})
    for event in client.watch(job):
        print(event["state"], event.get("progress"))
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from streamer.serve.connection import connect
from configs.keys import Keys
from streamer.serve.state import FINISHED, text

RECHECK_S = 5.0  # watch reads the job's hash at least this often, however busy the events are


class Client:
    def __init__(self, url: str, prefix: str = "gpen", *, redis=None):
        self.redis = redis or connect(url)
        self.keys = Keys(prefix)

    def submit(self, input_path: str | Path, output_path: str | Path, *, job_id: str | None = None,
               model: str | None = None, options: dict | None = None) -> str:
        """Queue a job; returns its id (yours, or a new one). Paths are made absolute here."""
        job_id = job_id or uuid.uuid4().hex
        fields = {"id": job_id, "input": str(Path(input_path).absolute()),
                  "output": str(Path(output_path).absolute())}
        if model:
            fields["model"] = model
        if options:
            fields["options"] = json.dumps(options)
        self.redis.xadd(self.keys.jobs, fields)
        return job_id

    def status(self, job_id: str) -> dict[str, str]:
        """The job's hash ({} if no daemon has seen it yet, or it expired)."""
        return {text(k): text(v) for k, v in self.redis.hgetall(self.keys.job(job_id)).items()}

    def cancel(self, job_id: str) -> None:
        self.redis.hset(self.keys.job(job_id), "cancel", "1")

    def watch(self, job_id: str, *, timeout_s: float | None = None) -> Iterator[dict[str, str]]:
        """The job's events as they come (the current state first), until it finishes. Events
        are read from the last one there before the state was read (never from "$", which
        would miss one written in between), and the state is read again when the events are
        quiet and every ``RECHECK_S`` (an event trimmed away cannot hang us)."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        last = self._last_event()
        current = self.status(job_id)
        if current:
            yield current
            if current.get("state") in FINISHED:
                return
        checked = time.monotonic()
        while deadline is None or time.monotonic() < deadline:
            reply = self.redis.xread({self.keys.events: last}, block=1000, count=100)
            for _stream, entries in reply or []:
                for entry, fields in entries:
                    last = text(entry)
                    event = {text(k): text(v) for k, v in fields.items()}
                    if event.get("id") == job_id:
                        yield event
                        if event.get("state") in FINISHED:
                            return
            if not reply or time.monotonic() - checked >= RECHECK_S:
                checked = time.monotonic()
                status = self.status(job_id)
                if status.get("state") in FINISHED:
                    yield status
                    return

    def _last_event(self) -> str:
        """The id of the newest event now ("0-0" if there is none)."""
        newest = self.redis.xrevrange(self.keys.events, count=1)
        return text(newest[0][0]) if newest else "0-0"

    def wait(self, job_id: str, timeout_s: float | None = None) -> dict[str, str]:
        """Block until the job finishes; its final hash."""
        for _ in self.watch(job_id, timeout_s=timeout_s):
            pass
        return self.status(job_id)

    def jobs(self, limit: int = 20) -> list[dict[str, str]]:
        """The most recently registered jobs, newest first (ids whose hash expired are skipped)."""
        ids = [text(i) for i in self.redis.zrevrange(self.keys.recent, 0, limit * 2)]
        out = []
        for job_id in ids:
            status = self.status(job_id)
            if status:
                out.append({"id": job_id, **status})
            if len(out) == limit:
                break
        return out
