"""The error classes every gpen-stream process shares. Each says whether trying the same job
again could help, which is what a daemon needs to know to retry or to give up:

- ``InputError``: the job's own fault (a file that is not a video, a truncated file, bad
  options, a path outside the allowed folders, a model nobody serves). The same job fails
  the same way every time: report it, do not retry.
- ``TransientError``: the world's fault (a worker died, Redis went away, the disk filled
  up). Another attempt, later or elsewhere, may succeed.
- ``Cancelled``: someone asked the job to stop. Not a failure.

An instance can override its class's choice (``retryable=...``): a download that timed out
is transient, a downloaded file with the wrong checksum is not.
"""

from __future__ import annotations


class GpenStreamError(Exception):
    """Base of the errors gpen-stream raises on purpose; ``str(exc)`` is the user's message."""

    retryable = False

    def __init__(self, message: str = "", *, retryable: bool | None = None):
        super().__init__(message)
        if retryable is not None:
            self.retryable = retryable


class InputError(GpenStreamError):
    """The job cannot succeed as given; retrying it gives the same error."""

    retryable = False


class TransientError(GpenStreamError):
    """Something outside the job failed; the same job may succeed on another attempt."""

    retryable = True


class Cancelled(GpenStreamError):
    """The job was cancelled (a signal, a cancel request); nothing was written."""

    retryable = False
