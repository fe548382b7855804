"""Publishing to a media server (``rtsp://``, ``rtmp://``, ``srt://``) from a child process of its own.

Why a process: PyAV bounds no output. Its timeout and interrupt callback exist for inputs only,
and ``start_encoding()`` (where RTMP and SRT connect, in ``avio_open``, and RTSP talks to the
server, in ``avformat_write_header``) and ``close()`` run with the GIL held. A server that accepts
the TCP connection and never answers therefore froze every thread of the job: the input, the
pipeline, the recording, and the main thread, so SIGTERM was never handled. FFmpeg's RTSP muxer
alone takes a socket timeout, but it too would hold the GIL for that long at every attempt, and
``avio_open`` takes no protocol options at all (RTMP, SRT). A write to a server that stopped
reading blocks just as long.

So the job encodes as before and muxes into NUT (FFmpeg's own container: any codec, timestamps
exact, headers in the stream), written to this child's stdin through a pipe whose every write
has a deadline (``PipeWriter``). The child (``main``, which imports nothing but PyAV) remuxes
those packets, unchanged, to the server and says ``connected`` once the server took the header.
The job's side (``Child``) gives up on it when it has not connected within ``connect_s``, when a
write cannot go through within ``connect_s`` (the child is stuck on the server), or when it
exits (the server refused or went away): the child is killed, which no hang inside FFmpeg can
resist, and the output reconnects with backoff (``streamer.io.stream_sink``).

The child's first stdin line is a JSON order (URL, muxer, options): credentials in the URL never
appear on a command line. It ignores SIGINT (the job ends it by closing its stdin, after the
trailer, or by SIGKILL) and dies with the thread that started it (PR_SET_PDEATHSIG), so none
outlives its job. What it prints on stdout is one JSON object per line.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import av

PIPE_FORMAT = "nut"
# The muxer writes each packet through at once (a live picture must not wait in a buffer), and
# the child's demuxer starts on the header alone instead of probing seconds of input first.
PIPE_MUX_OPTIONS = {"flush_packets": "1", "write_index": "0"}
PIPE_DEMUX_OPTIONS = {"probesize": "32", "analyzeduration": "0"}  # not nobuffer: it drops what was probed
PR_SET_PDEATHSIG = 1


class OutputStuck(OSError):
    """The child did not take what was sent, or did not connect, in time."""


class ChildFailed(OSError):
    """The child ended; ``fatal`` when no reconnect can mend it (this FFmpeg lacks the protocol...)."""

    def __init__(self, message: str, fatal: bool = False):
        super().__init__(message)
        self.fatal = fatal


class PipeWriter:
    """A file object for PyAV's output: writes to a non-blocking pipe, each write within ``timeout_s``
    (``deadline``, when set, may cut that shorter: a closing job does not wait long)."""

    def __init__(self, fd: int, timeout_s: float):
        self.fd, self.timeout_s = fd, timeout_s
        self.deadline: float | None = None
        self.closed = False  # the child is gone: its fd number may already be another file's
        os.set_blocking(fd, False)

    def write(self, data) -> int:
        if self.closed:
            raise BrokenPipeError("the publishing process is gone")
        view = memoryview(data)
        limit = time.monotonic() + self.timeout_s
        if self.deadline is not None:
            limit = min(limit, self.deadline)
        while view:
            left = limit - time.monotonic()
            if left <= 0:
                raise OutputStuck(f"the output took nothing for {self.timeout_s:g} s")
            _, ready, _ = select.select([], [self.fd], [], left)
            if ready:
                try:
                    view = view[os.write(self.fd, view):]
                except BlockingIOError:
                    continue
        return len(data)


class Child:
    """The job's side of one publishing process."""

    def __init__(self, url: str, muxer: str, options: dict[str, str], *, connect_s: float):
        self.connect_s = connect_s
        self.connected = False
        self._log = tempfile.TemporaryFile()
        env = dict(os.environ)
        root = str(Path(__file__).resolve().parents[2])  # the child imports this module, installed or not
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        self.proc = subprocess.Popen([sys.executable, "-m", "streamer.io.publisher"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self._log, env=env, close_fds=True)
        self.started = time.monotonic()
        self._out = b""
        os.set_blocking(self.proc.stdout.fileno(), False)
        self.writer = PipeWriter(self.proc.stdin.fileno(), connect_s)
        try:
            self.writer.write((json.dumps({"url": url, "muxer": muxer, "options": options}) + "\n").encode())
        except BaseException:  # it took not even its order: it is not left running
            self.kill()
            raise

    def check(self) -> bool:
        """Raises ``ChildFailed`` or ``OutputStuck`` when this output must be given up; returns
        True the first time the child reports it connected."""
        was = self.connected
        for message in self._messages():
            if "error" in message:
                raise ChildFailed(message["error"], message.get("fatal", False))
            if message.get("connected"):
                self.connected = True
        if self.proc.poll() is not None:
            raise ChildFailed(self._why_it_ended())
        if not self.connected and time.monotonic() - self.started > self.connect_s:
            raise OutputStuck(f"no answer from the server within {self.connect_s:g} s")
        return self.connected and not was

    def finish(self, deadline: float) -> None:
        """No more input: the child writes the trailer and exits, by ``deadline`` or it is killed."""
        try:
            self.proc.stdin.close()
        except OSError:  # it is gone, or the pipe is full: it will not read the rest anyway
            pass
        try:
            self.proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
        self.kill()

    def kill(self) -> None:
        self.writer.closed = True
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout, self._log):
            try:
                f.close()
            except OSError:
                pass

    def _messages(self) -> list[dict]:
        try:
            while chunk := os.read(self.proc.stdout.fileno(), 4096):
                self._out += chunk
        except (BlockingIOError, ValueError, OSError):
            pass
        *lines, self._out = self._out.split(b"\n")
        return [json.loads(line) for line in lines if line.strip()]

    def _why_it_ended(self) -> str:
        self._log.seek(0)
        lines = self._log.read().decode(errors="replace").strip().splitlines()
        return lines[-1] if lines else f"the publishing process ended (exit status {self.proc.returncode})"


# ---------------------------------------------------------------------- the child


class _Stdin:
    """Stdin for PyAV: a read returns what has arrived (a buffered read(n) on a pipe would wait
    for all n bytes, holding pictures back)."""

    def read(self, size: int) -> bytes:
        return os.read(0, size)

    def readline(self) -> bytes:
        line = b""
        while not line.endswith(b"\n") and (byte := os.read(0, 1)):
            line += byte
        return line


def _say(**message) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


def _die_with_parent() -> None:
    try:
        import ctypes

        ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux: the parent's stdin EOF still ends it
        pass
    if os.getppid() == 1:  # the parent went before the line above
        os._exit(1)


FATAL_ERRORS = (av.error.ProtocolNotFoundError, av.error.MuxerNotFoundError, av.error.OptionNotFoundError)


def main() -> int:
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    av.logging.set_level(av.logging.ERROR)
    stdin = _Stdin()
    try:
        order = json.loads(stdin.readline())
        source = av.open(stdin, "r", format=PIPE_FORMAT, options=PIPE_DEMUX_OPTIONS)
        out = av.open(order["url"], "w", format=order["muxer"], options=order["options"])
        streams = {s.index: out.add_stream_from_template(s) for s in source.streams}
        out.start_encoding()
        _say(connected=True)
        for packet in source.demux():
            if packet.size == 0:  # the demuxer's end-of-stream marker
                continue
            packet.stream = streams[packet.stream.index]
            out.mux(packet)
        out.close()
    except FATAL_ERRORS as exc:
        _say(error=str(exc), fatal=True)
        return 1
    except (av.error.FFmpegError, OSError, ValueError) as exc:
        _say(error=str(exc).split(";")[0])
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
