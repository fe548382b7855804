"""Logging setup: human-readable lines or one JSON object per line (``--log-format json``).

Every line logged while a job runs carries its id (``job``): the daemon sets ``JOB`` in the
job's thread, the pipeline's stage threads inherit it, and a filter copies it onto each record
(``[job <id>]`` at the end of a text line, a ``job`` field in JSON).

No line carries a credential: both formatters pass what they write, tracebacks included,
through ``redact_text`` (a camera's ``rtsp://user:password@...``, a Redis URL's
``?password=``, an SRT ``passphrase``), whichever module logged it and however (an
exception's text often repeats the URL it failed on).
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
import sys
import time
from urllib.parse import urlsplit, urlunsplit

JOB: contextvars.ContextVar[str | None] = contextvars.ContextVar("job", default=None)

SECRET_PARAMS = frozenset({"password", "passwd", "pwd", "passphrase", "secret", "token"})  # in a URL's query
_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>]+")
# A URL's user:password@, found before any parsing: a password may hold characters a URL
# parser takes for the end of the host ('#', '/', '?') or a quote. It runs to the last '@' of
# the unbroken text after the user name (so a password with '@' in it is hidden whole too).
_USERINFO = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://[^\s@/:'\"<>]*):\S*@")


def redact(url: str) -> str:
    """``url`` without its secrets: the password of its user part and the values of the query
    parameters in SECRET_PARAMS. Everything else as given (IPv6 brackets, port)."""
    url = _USERINFO.sub(r"\1:***@", url)
    try:
        parts = urlsplit(url)
    except ValueError:  # "rtsp://[::1": nothing of it past the scheme is shown
        return f"{url.split(':', 1)[0]}://(a URL that cannot be parsed)"
    userinfo, at, hostport = parts.netloc.rpartition("@")
    netloc = f"{userinfo.split(':', 1)[0]}:***@{hostport}" if at and ":" in userinfo else parts.netloc
    query = "&".join(_hide_secret(item) for item in parts.query.split("&")) if parts.query else ""
    if (netloc, query) == (parts.netloc, parts.query):
        return url
    return urlunsplit(parts._replace(netloc=netloc, query=query))


def _hide_secret(item: str) -> str:
    name, eq, value = item.partition("=")
    if not eq or name.lower() not in SECRET_PARAMS:
        return item
    after = re.search(r"[.,:;!)\]]*$", value).group(0)  # the sentence's, not the secret's
    return f"{name}=***{after}"


def redact_text(text: str) -> str:
    """``text`` with every URL in it redacted."""
    if "://" not in text:
        return text
    return _URL.sub(lambda m: redact(m.group(0)), _USERINFO.sub(r"\1:***@", text))


_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {"ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
                 "level": record.levelname.lower(), "logger": record.name, "msg": record.getMessage()}
        entry.update({k: v for k, v in vars(record).items() if k not in _STANDARD and v is not None})
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return redact_text(json.dumps(entry, default=str))


class TextFormatter(logging.Formatter):
    def __init__(self):
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s", "%H:%M:%S")

    def format(self, record: logging.LogRecord) -> str:
        line = redact_text(super().format(record))
        job = getattr(record, "job", None)
        return f"{line} [job {job}]" if job else line


def _with_job(record: logging.LogRecord) -> bool:
    if getattr(record, "job", None) is None:
        record.job = JOB.get()
    return True


def setup(level: str = "info", fmt: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(_with_job)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    import av.logging

    # FFmpeg's own lines (decoders' "error while decoding MB", demuxers' complaints) go through
    # Python logging as "libav.*", shown only at debug level: what they mean reaches the user
    # once, in gpen-stream's own message and summary (damage is counted, not printed raw).
    av.logging.set_level(av.logging.WARNING if level == "debug" else av.logging.ERROR)
    av.logging.set_skip_repeated(False)
    logging.getLogger("libav").setLevel(logging.DEBUG if level == "debug" else logging.CRITICAL + 1)
