"""Connecting to Redis: from a URL (``redis://``, ``rediss://`` for TLS, an ACL user and a
password in the URL), checked at once, with one clear line when nothing answers. Light on
purpose: the client commands import only this."""

from __future__ import annotations

from urllib.parse import urlsplit

import redis as redis_lib

from configs.errors import TransientError
from streamer.logs import redact  # noqa: F401  (imported from here by the serve and stream modules)

REDIS_ERRORS = (redis_lib.ConnectionError, redis_lib.TimeoutError)
# Error replies that say Redis cannot take the command for now (out of memory at maxmemory, a
# replica just after a failover, a failed snapshot, loading its data, busy with a script): they
# pass, so they are retried like a lost connection, never taken as the answer.
TRANSIENT_REPLIES = ("OOM", "READONLY", "MISCONF", "LOADING", "BUSY", "TRYAGAIN", "MASTERDOWN", "CLUSTERDOWN",
                     "NOREPLICAS")


class RedisUnavailable(TransientError):
    """Redis cannot be reached."""


def transient(exc: BaseException) -> bool:
    """Whether ``exc`` says Redis is away or refusing for now (retry later), not that the
    command itself is wrong."""
    if isinstance(exc, REDIS_ERRORS):
        return True
    if not isinstance(exc, redis_lib.ResponseError):
        return False
    code = getattr(exc, "status_code", None) or str(exc).split(" ", 1)[0]
    return code in TRANSIENT_REPLIES or isinstance(exc, (redis_lib.exceptions.OutOfMemoryError,
                                                         redis_lib.exceptions.ReadOnlyError,
                                                         redis_lib.exceptions.BusyLoadingError))


def connect(url: str):
    """A client for ``url`` (redis://, rediss:// for TLS, user and password in the URL),
    checked with a PING; RedisUnavailable with one clear line if nothing answers."""
    try:
        client = redis_lib.Redis.from_url(url, socket_connect_timeout=5, socket_timeout=30,
                                          health_check_interval=10)
        client.ping()
    except (redis_lib.AuthenticationError, redis_lib.ResponseError, ValueError) as exc:  # before ConnectionError,
        raise RedisUnavailable(f"Redis at {redact(url)} refused us: {exc}", retryable=False) from None  # its parent
    except REDIS_ERRORS as exc:
        host = urlsplit(url).hostname or "127.0.0.1"
        port = urlsplit(url).port or 6379
        hint = (f"; start one with: redis-server --port {port} --appendonly yes"
                if host in ("127.0.0.1", "localhost", "::1") else "")
        raise RedisUnavailable(f"cannot reach Redis at {redact(url)} ({exc}){hint}, or give --redis URL") from None
    return client
