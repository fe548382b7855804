"""Writing files so that nobody ever sees half of one: the one helper every writer uses
(restored videos, faces files, downloaded weights).

The data goes to a hidden temporary file beside the destination (same folder, so the final
rename is atomic on every POSIX file system), named ``.<stem>.<random>.part<suffix>`` so the
real extension stays last (FFmpeg picks its muxer from it). ``commit()`` flushes it to disk,
gives it the permissions a new file would have had, and renames it over the destination;
``abort()`` deletes it. Used as a context manager it commits on success, aborts on error.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

PART_MARKER = ".part"  # every temporary file's name contains this
ATTEMPT_MARK = "~"  # between a tag and an attempt number (job ids never hold it)


def attempt_tag(tag: str, attempt: int) -> str:
    """The tag of one attempt at writing ``tag``'s file: two attempts never share a temporary file."""
    return f"{tag}{ATTEMPT_MARK}{attempt}"


def tagged_parts(dest: str | Path, tag: str) -> list[Path]:
    """The temporary files beside ``dest`` of writers tagged ``tag`` or ``attempt_tag(tag, n)``:
    what attempts that crashed, or were taken over, left behind."""
    dest = Path(dest)
    name = re.compile(re.escape(f".{dest.stem}.{tag}") + f"(?:{re.escape(ATTEMPT_MARK)}[0-9]+)?"
                      + re.escape(f"{PART_MARKER}{dest.suffix}"))
    try:
        names = os.listdir(dest.parent)
    except OSError:
        return []
    return [dest.parent / n for n in names if name.fullmatch(n)]


class AtomicFile:
    """``tag``: a stable name for the temporary file instead of a random one (the daemon uses
    the job id and the attempt, ``attempt_tag``, and removes older attempts' files with
    ``tagged_parts``)."""

    def __init__(self, dest: str | Path, *, tag: str | None = None):
        self.dest = Path(dest)
        if tag is None:
            fd, tmp = tempfile.mkstemp(prefix=f".{self.dest.stem}.", suffix=f"{PART_MARKER}{self.dest.suffix}",
                                       dir=self.dest.parent)
        else:
            tmp = self.dest.parent / f".{self.dest.stem}.{tag}{PART_MARKER}{self.dest.suffix}"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        os.close(fd)
        self.tmp = Path(tmp)
        self.done = False

    def open(self, mode: str = "wb", **kwargs):
        """The temporary file, opened for writing (the caller closes it before commit)."""
        return open(self.tmp, mode, **kwargs)

    def commit(self, *, fsync: bool = True) -> Path:
        if fsync:
            with open(self.tmp, "rb+") as f:
                os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(self.tmp, 0o666 & ~umask)  # mkstemp makes files private; outputs should not be
        os.replace(self.tmp, self.dest)
        self.done = True
        if fsync:
            _fsync_dir(self.dest.parent)
        return self.dest

    def abort(self) -> None:
        if not self.done:
            self.tmp.unlink(missing_ok=True)
            self.done = True

    def __enter__(self) -> "AtomicFile":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None and not self.done:
            self.commit()
        else:
            self.abort()


class AtomicText(AtomicFile):
    """A text file written line by line (``--dump-faces``), renamed into place on commit."""

    def __init__(self, dest: str | Path):
        super().__init__(dest)
        self.file = self.open("w", encoding="utf-8")

    def write(self, text: str) -> None:
        self.file.write(text)

    def commit(self, *, fsync: bool = True) -> Path:
        self.file.close()
        return super().commit(fsync=fsync)

    def abort(self) -> None:
        self.file.close()
        super().abort()


def _fsync_dir(folder: Path) -> None:
    """Make the rename itself durable (a crash right after commit keeps the new file)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
