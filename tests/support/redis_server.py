"""A real redis-server for tests, started on a free loopback port in a private folder and
stopped afterwards. Tests never flush a server: each uses its own key prefix. With
``REDIS_URL`` set, tests use that server instead (still only under their own prefixes)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
import uuid
from pathlib import Path

import redis


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    def __init__(self, folder: Path, *, appendonly: bool = True, password: str | None = None):
        self.folder, self.appendonly, self.password = Path(folder), appendonly, password
        self.folder.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self) -> "RedisServer":
        exe = shutil.which("redis-server")
        if exe is None:
            raise RuntimeError("redis-server is not installed (apt-get install redis-server; .ci/run does it)")
        cmd = [exe, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.folder), "--save", "",
               "--appendonly", "yes" if self.appendonly else "no", "--appendfsync", "always",
               "--logfile", str(self.folder / "redis.log")]
        if self.password:
            cmd += ["--requirepass", self.password]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 20
        while True:
            try:
                redis.Redis.from_url(self.url, socket_connect_timeout=0.5).ping()
                return self
            except redis.ConnectionError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server did not start: {(self.folder / 'redis.log').read_text()[-500:]}")
                time.sleep(0.05)

    def stop(self) -> None:
        """A clean shutdown (SIGTERM): with append-only on, everything written survives."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(20)
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url)


def unique_prefix() -> str:
    return f"t{uuid.uuid4().hex[:10]}"


def external_url() -> str | None:
    return os.environ.get("REDIS_URL")
