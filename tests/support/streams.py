"""Live streams for tests and benchmarks: real servers and clients on 127.0.0.1, no mocks.

- ``RtspRelay``: an RTSP server (gst-rtsp-server, ``rtsp_relay.py``); publishers RECORD, readers PLAY.
- ``Publisher``: a clip sent in real time to rtsp:// udp:// rtmp:// or a file, each frame's index
  drawn in its corner (``stamp_index``/``read_index``); ``stop(abrupt=...)``, ``restart()``.
- Readers: ``read_frame_indices`` (here, blocking; files and HLS too), ``StreamReader`` (a helper
  process), ``UdpReceiver``, ``RtspListenReceiver`` and ``RtmpListenReceiver`` (servers for exactly
  one publisher, to test our outputs). All return a ``Capture``: index, pts and arrival of each picture.

Measured on this machine (2 cores; PyAV 18.1 / FFmpeg 8.1; gst-rtsp-server 1.22; libx264 veryfast
zerolatency, keyframe every 30 frames; 320x240 at 30 fps unless said):
- Latency publish->decode, steady: RTSP through the relay median 40 ms (1280x720: 50 ms, p95 65-75 ms,
  0 lost in 10 s); RTSP to a listen receiver 37 ms; UDP MPEG-TS 70 ms; RTMP 3 ms with ``LOW_DELAY``.
  FFmpeg's RTSP demuxer hands a frame over only when the next frame's first packet arrives: one
  frame interval (105 ms at 10 fps). MPEG-TS over UDP costs about two (200 ms at 10 fps).
- Time to first picture: with default probing an RTSP reader opens in ~0.8 s and the frames read
  while probing come out as a burst (latency 950 ms falling to 40 ms over ~25 frames); the first
  frame may have ``pts`` None. With ``LOW_DELAY`` it opens in ~0.3 s but starts at the next keyframe
  (up to one GOP). This relay answers DESCRIBE only once it has seen SPS, i.e. at a keyframe, so
  opening itself can take up to one GOP (MediaMTX answers from the publisher's SDP). RTMP with
  default probing: 5 s to open (analyzeduration) and it stays ~0.5 s behind; use ``LOW_DELAY``.
- Publisher leaves (TEARDOWN or killed: the relay sees the TCP close within 10 ms): relay readers
  get EOF at once ("disconnect", MediaMTX's behaviour); PLAY then gets 404 (HTTPNotFoundError) until
  a publisher is back; after a restart the first picture comes ~0.9 s after the publisher process
  starts (process start, connect, keyframe). "stall" mode: no EOF, nothing arrives; a reader with
  ``timeout=(open_s, read_s)`` raises av.error.ExitError after 2 x read_s (the demuxer holds the last
  frame until the first timeout releases it; the second one raises); if the publisher is back
  within read_s the same connection carries on, pts jumping by about the gap, then a burst.
- pts through the relay are stamped on arrival at the relay: the first frames of a session (its
  jitter-buffer backlog) have nearly equal pts. A live reader must not derive timing from pts spacing.
- An open timeout during a DESCRIBE that gets no answer surfaces as InvalidDataError, not as a timeout.
- UDP has no end: the reader ends on its read timeout (ExitError). A receiver must be bound before
  the sender starts (earlier datagrams are lost); joining mid-stream works (SPS/PPS repeat in-band).
- RTSP listen (``rtsp_flags=listen``): ``listen_timeout`` must be set; its default fails at once with
  ERANGE in FFmpeg 8.1. One publisher; EOF when it leaves. RTMP listen: the publisher leaving reads
  as OSError (EIO), not EOF. PyAV cannot make an *output* listen (it opens outputs without options),
  so testing an RTMP *input* needs an RTMP server (not set up here).
- SRT (and RIST): not in PyAV's FFmpeg (ProtocolNotFoundError; the wheels have no libsrt); "srt" in
  ``av.formats_available`` is the SubRip subtitle format. Debian's ffmpeg CLI has srt; PyAV does not.
- Audio: AAC passes the relay on the ``av`` path (H.264 then AAC); a publisher whose tracks do not
  match the path's layout is refused with a 4xx, raised at its first ``mux``.
- PyAV publishing: the connection (RTSP ANNOUNCE/SETUP/RECORD) happens at the first ``mux``, not in
  ``av.open``; PyAV's RTSP output has a global header, so SPS/PPS travel only in the SDP (the relay
  re-inserts them before every keyframe, or readers joining mid-stream never decode). x264 with
  ``tune=zerolatency`` cuts pictures into slices that this relay corrupts: ``sliced-threads=0``.
- PyAV and the GIL: see "Helper processes" below; it is why publishers and readers run as processes.
"""

from __future__ import annotations

import argparse
import atexit
import functools
import json
import math
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Callable, Iterator, Sequence

import av
import numpy as np

HOST = "127.0.0.1"
SYSTEM_PYTHON = "/usr/bin/python3"  # python3-gi lives there, not in the venv
RELAY_SCRIPT = Path(__file__).with_name("rtsp_relay.py")
RELAY_PACKAGES = ("python3-gi gir1.2-gst-rtsp-server-1.0 gstreamer1.0-plugins-base gstreamer1.0-plugins-good "
                  "gstreamer1.0-plugins-bad gstreamer1.0-plugins-ugly gstreamer1.0-libav")

# Every helper that owns a process registers here, so a test that fails half-way (or an interpreter
# that exits without running fixtures' teardown) leaves nothing running.
_live: set = set()
_live_lock = threading.Lock()


def _track(obj) -> None:
    with _live_lock:
        _live.add(obj)


def _untrack(obj) -> None:
    with _live_lock:
        _live.discard(obj)


@atexit.register
def stop_all() -> None:
    """Stop every relay, publisher and reader still running (also run at interpreter exit)."""
    with _live_lock:
        objs = list(_live)
    for obj in objs:
        try:
            obj.stop()
        except Exception:  # noqa: BLE001 - best effort at teardown; keep stopping the rest
            pass


# ----------------------------------------------------------------------------------------------
# Frame index drawn in the picture
#
# Two rows of 16 square cells in the top-left corner: the index's bits (most significant first,
# white = 1) over their complement. The complement lets a reader tell a corrupt or half-decoded
# picture (None) from a wrong index. Cells are 1/40 of the frame width, so the stamp reads back
# after scaling as long as the aspect ratio is kept; at 320 px wide a cell is 8x8, one H.264 block.

INDEX_BITS = 16
_CELL = 1 / 40


def _cell_edges(width: int) -> np.ndarray:
    return np.round(np.arange(INDEX_BITS + 1) * width * _CELL).astype(int)


def stamp_index(rgb: np.ndarray, index: int) -> np.ndarray:
    """Draw ``index`` (mod 2**16) into ``rgb`` (H x W x 3 uint8) in place; returns it."""
    edges = _cell_edges(rgb.shape[1])
    bits = [(index >> (INDEX_BITS - 1 - b)) & 1 for b in range(INDEX_BITS)]
    for row, values in enumerate((bits, [1 - v for v in bits])):
        y0, y1 = edges[row], edges[row + 1]
        for b, v in enumerate(values):
            rgb[y0:y1, edges[b]:edges[b + 1]] = 255 if v else 0
    return rgb


def _luma(frame) -> np.ndarray:
    if isinstance(frame, np.ndarray):
        return frame if frame.ndim == 2 else frame[..., :3].mean(axis=2)
    if frame.format.name in ("yuv420p", "yuvj420p", "yuv422p", "yuvj422p", "yuv444p", "yuvj444p", "nv12"):
        plane = frame.planes[0]  # 8-bit luma: read it in place, no conversion of the whole picture
        rows = np.frombuffer(plane, np.uint8).reshape(plane.height, plane.line_size)
        return rows[:, :plane.width]
    return frame.to_ndarray(format="gray")


def read_index(frame) -> int | None:
    """The index drawn by ``stamp_index`` in an ``av.VideoFrame`` or RGB/gray array; None when the
    stamp does not read back consistently (corrupt picture, or not one of ours)."""
    y = _luma(frame)
    edges = _cell_edges(y.shape[1])
    if edges[2] > y.shape[0]:
        return None
    value = 0
    for b in range(INDEX_BITS):
        x0, x1 = edges[b], edges[b + 1]
        q = max(1, (x1 - x0) // 4)  # inner half of each cell: edges blur under compression
        cells = [y[edges[r] + q:edges[r + 1] - q, x0 + q:x1 - q].mean() > 128 for r in (0, 1)]
        if cells[0] == cells[1]:
            return None
        value = (value << 1) | int(cells[0])
    return value


def pattern_frame(index: int, width: int = 320, height: int = 240) -> np.ndarray:
    """A cheap moving picture (gradient and a sweeping bar) with ``index`` stamped on it."""
    x = (np.arange(width, dtype=np.int32) + 4 * index) % 256
    y = np.arange(height, dtype=np.int32)[:, None]
    rgb = np.empty((height, width, 3), np.uint8)
    rgb[..., 0] = x[None, :]
    rgb[..., 1] = y * 255 // max(1, height - 1)
    rgb[..., 2] = 128
    bar = (8 * index) % width
    rgb[:, bar:bar + 8] = 255
    return stamp_index(rgb, index)


# ----------------------------------------------------------------------------------------------
# Ports and protocols

def free_port(kind: str = "tcp") -> int:
    """A port free on 127.0.0.1 now (the OS picks it; a clash before use is possible but unlikely)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM if kind == "tcp" else socket.SOCK_DGRAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def port_bound(port: int, kind: str = "tcp") -> bool:
    """Whether something listens on (tcp) or has bound (udp) ``port``. Read from /proc, so checking
    does not take the one connection that a listen-mode receiver accepts."""
    wanted = {"tcp": "0A", "udp": "07"}[kind]  # TCP_LISTEN; a bound UDP socket shows TCP_CLOSE
    for table in (f"/proc/net/{kind}", f"/proc/net/{kind}6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            cols = row.split()
            if int(cols[1].rsplit(":", 1)[1], 16) == port and cols[3] == wanted:
                return True
    return False


def wait_port(port: int, kind: str = "tcp", timeout: float = 10.0, alive: Callable[[], bool] = lambda: True) -> None:
    """Wait until ``port_bound``; gives up early when ``alive()`` turns False (the owner died)."""
    deadline = time.monotonic() + timeout
    while not port_bound(port, kind):
        if time.monotonic() > deadline or not alive():
            raise TimeoutError(f"nothing {'listens' if kind == 'tcp' else 'bound'} on {kind} port {port} "
                               f"after {timeout:.0f} s")
        time.sleep(0.02)


@functools.lru_cache(maxsize=None)
def protocol_available(name: str) -> bool:
    """Whether PyAV's FFmpeg has the ``name`` protocol. "srt" is not: the PyPI wheels are built
    without libsrt (``"srt" in av.formats_available`` is the SubRip subtitle format, not the protocol)."""
    try:
        av.open(f"{name}://{HOST}:9", timeout=0.5).close()  # port 9: discard, nothing listens
    except av.error.ProtocolNotFoundError:
        return False
    except Exception:  # noqa: BLE001 - any other failure means the protocol exists and tried
        return True
    return True


@functools.lru_cache(maxsize=None)
def rtsp_relay_unavailable() -> str | None:
    """Why the RTSP relay cannot run here, or None when it can (a reason to skip tests with)."""
    if not os.access(SYSTEM_PYTHON, os.X_OK):
        return f"{SYSTEM_PYTHON} not found; the RTSP relay needs Debian's python3 with python3-gi"
    probe = subprocess.run([SYSTEM_PYTHON, str(RELAY_SCRIPT), "--check"], capture_output=True, text=True, timeout=60)
    if probe.returncode:
        return (f"gst-rtsp-server for {SYSTEM_PYTHON} is missing (apt-get install {RELAY_PACKAGES}): "
                + (probe.stderr.strip().splitlines() or ["?"])[-1])
    return None


# ----------------------------------------------------------------------------------------------
# Helper processes
#
# Publishers and readers run in their own processes, not threads. PyAV 18.1 holds the GIL, with no
# timeout, while it connects an output (avio_open: udp/rtmp/srt; avformat_write_header: the RTSP
# ANNOUNCE/SETUP/RECORD exchange) and while it closes one (av_write_trailer: RTSP TEARDOWN); and an
# input opened with ``timeout=`` takes the GIL in its interrupt callback at every I/O wait. In one
# process, a publisher connecting to a listen-mode receiver therefore deadlocks with it, and any
# blocking connect freezes every other thread. Processes also make an abrupt stop possible (SIGKILL:
# no TEARDOWN, like a camera losing power).

class _Child:
    """A helper process. Its stdin stays an open pipe: children exit when they read EOF there, so
    none outlives this process. Stdout lines go to ``on_line`` from a thread; stderr is kept in a
    temporary file for error messages."""

    def __init__(self, argv: list[str], on_line: Callable[[str], None]):
        self._log = tempfile.TemporaryFile()
        self._last_log = ""
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log)
        self.output_done = threading.Event()
        threading.Thread(target=self._pump, args=(on_line,), name=f"child {argv[1]}", daemon=True).start()

    def _pump(self, on_line) -> None:
        try:
            for raw in self.proc.stdout:
                try:
                    on_line(raw.decode(errors="replace").rstrip("\n"))
                except Exception as e:  # noqa: BLE001 - keep draining, or the child blocks on a full pipe
                    print(f"streams: bad line from {self.proc.args[1]}: {raw!r}: {e}", file=sys.stderr)
        finally:
            self.output_done.set()

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def log(self) -> str:
        """The end of what the child wrote on stderr."""
        if not self._log.closed:
            self._log.seek(0)
            self._last_log = self._log.read().decode(errors="replace")[-4000:]
        return self._last_log

    def wait(self, timeout: float) -> int | None:
        """Wait for the child to exit by itself and its output to be read; None if it is still running."""
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None
        self.output_done.wait(5)
        return self.proc.returncode

    def stop(self, sig: int = signal.SIGTERM, grace: float = 5.0) -> int:
        """Send ``sig``, wait ``grace`` seconds, then SIGKILL. Returns the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.output_done.wait(5)
        self.log()
        for pipe in (self.proc.stdin, self.proc.stdout):
            pipe.close()
        self._log.close()
        return self.proc.returncode


def _python_child(command: str, args: dict, on_line: Callable[[str], None]) -> _Child:
    """This module run as a script in the venv's Python (see ``_main``)."""
    return _Child([sys.executable, str(Path(__file__).resolve()), command, json.dumps(args)], on_line)


def _exit_when_parent_goes(action: Callable[[], None]) -> None:
    """In a child: run ``action`` when stdin reaches EOF (the parent closed it or died)."""
    def watch():
        while os.read(0, 4096):  # the raw fd: a thread blocked in sys.stdin would hold its lock at exit
            pass
        action()
    threading.Thread(target=watch, daemon=True).start()


def _say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


# ----------------------------------------------------------------------------------------------
# RTSP relay (gst-rtsp-server, see rtsp_relay.py)

class RtspRelay:
    """A real RTSP server on a free loopback port: publishers RECORD to ``publish_url``, readers PLAY
    ``play_url``. ``audio=True`` uses the path that carries H.264 + AAC (the publisher must send both).
    ``on_publisher_stop``: "disconnect" (readers are dropped, as MediaMTX does) or "stall" (readers stay
    connected and get nothing, like a dead network link, and resume if the publisher comes back).

        with RtspRelay() as relay, Publisher(relay.publish_url):
            capture = read_frame_indices(relay.play_url, frames=30)
    """

    def __init__(self, *, audio: bool = False, on_publisher_stop: str = "disconnect",
                 latency_ms: int = 200, ready_timeout: float = 20.0):
        self.path = "av" if audio else "cam"
        self.on_publisher_stop = on_publisher_stop
        self.latency_ms = latency_ms
        self.ready_timeout = ready_timeout
        self.port: int | None = None
        self.events: list[tuple[float, str]] = []  # (time.monotonic(), "PUBLISH cam" | "UNPUBLISH cam" | "PLAY cam")
        self._changed = threading.Condition()
        self._child: _Child | None = None

    def url(self, path: str) -> str:
        return f"rtsp://{HOST}:{self.port}/{path}"

    @property
    def publish_url(self) -> str:
        return self.url(self.path)

    @property
    def play_url(self) -> str:
        return self.url(f"{self.path}_out")

    def start(self) -> "RtspRelay":
        reason = rtsp_relay_unavailable()
        if reason:
            raise RuntimeError(reason)
        self._child = _Child([SYSTEM_PYTHON, str(RELAY_SCRIPT), "--port", "0", "--latency-ms",
                              str(self.latency_ms), "--on-publisher-stop", self.on_publisher_stop], self._on_line)
        _track(self)
        try:
            self.wait_event("READY", timeout=self.ready_timeout)
            wait_port(self.port, "tcp", timeout=5)
        except BaseException:
            self.stop()
            raise
        return self

    def _on_line(self, line: str) -> None:
        with self._changed:
            if line.startswith("READY "):
                self.port = int(line.split()[1])
                line = "READY"
            self.events.append((time.monotonic(), line))
            self._changed.notify_all()

    def wait_event(self, event: str, after: float = 0.0, timeout: float = 10.0) -> float:
        """Wait until the relay reports ``event`` (e.g. "PUBLISH cam") at or after monotonic time
        ``after``; returns when it was reported."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for t, e in self.events:
                    if e == event and t >= after:
                        return t
                left = deadline - time.monotonic()
                if left <= 0 or (self._child.output_done.is_set()):
                    raise TimeoutError(f"RTSP relay did not report {event!r} in {timeout:.0f} s; events "
                                       f"{[e for _, e in self.events]}; log: {self.log()}")
                self._changed.wait(min(left, 0.2))

    def wait_publishing(self, timeout: float = 10.0, after: float = 0.0) -> float:
        """Wait until a publisher is on this relay's path (it is then ready for readers)."""
        return self.wait_event(f"PUBLISH {self.path}", after, timeout)

    def log(self) -> str:
        """The end of what the relay wrote on stderr (GStreamer warnings, tracebacks)."""
        return self._child.log() if self._child else ""

    def stop(self) -> int | None:
        """SIGTERM, then wait (SIGKILL after 5 s). Returns the exit status; safe to call twice."""
        _untrack(self)
        return self._child.stop() if self._child and not self._child.proc.stdin.closed else None

    def __enter__(self) -> "RtspRelay":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


# ----------------------------------------------------------------------------------------------
# Publisher

def _scheme(url: str) -> str:
    return url.split("://", 1)[0].lower() if "://" in url else "file"


def output_format(url: str, transport: str = "tcp") -> tuple[str | None, dict]:
    """The container format and options to send to ``url`` (a file picks its format from its name)."""
    scheme = _scheme(url)
    if scheme == "rtsp":
        return "rtsp", {"rtsp_transport": transport}
    if scheme in ("udp", "srt"):
        return "mpegts", {}
    if scheme == "rtmp":
        return "flv", {}
    return None, {}


X264_LIVE = {
    "preset": "veryfast",
    "tune": "zerolatency",
    # zerolatency turns sliced threads on; several slices per picture come out corrupted (green)
    # through gst-rtsp-server's depay/pay. One thread: the encoder holds no frames back.
    "x264-params": "sliced-threads=0",
    "threads": "1",
    "bf": "0",
    "sc_threshold": "0",  # keyframes exactly every g frames, none on scene changes: predictable joins
}


class Publisher:
    """Sends a clip to ``url`` in real time, paced at ``fps``, from a helper process; each frame
    carries its index (``stamp_index``), counted on across loops and restarts, so a reader can check
    order and drops. ``sent[index]`` is when that frame went to the encoder (``time.monotonic()``,
    one clock for all processes), for latency.

    ``source``: None (a generated moving pattern of ``size``), a sequence of RGB frames, or a video
    file. ``loop``: start the source again at its end; ``count``: stop after that many frames in a
    session. ``audio``: add an AAC track (48 kHz stereo tone). ``url``: rtsp:// (RECORD over
    ``transport`` tcp or udp), udp:// (MPEG-TS), rtmp:// (FLV, to a server: PyAV cannot make an output
    listen, it opens outputs without options) or a file path. The encoder is libx264 with
    ``X264_LIVE`` and a keyframe every ``gop`` frames (default: one a second).
    """

    def __init__(self, url: str, source: Sequence[np.ndarray] | str | Path | None = None, *,
                 fps: int = 30, size: tuple[int, int] = (320, 240), loop: bool = True,
                 count: int | None = None, audio: bool = False, gop: int | None = None,
                 transport: str = "tcp", codec_options: dict | None = None, start_index: int = 0):
        self.url, self.fps, self.size = str(url), fps, size
        self.loop, self.count, self.audio, self.gop = loop, count, audio, gop or fps
        self.transport = transport
        self.codec_options = {**X264_LIVE, "g": str(self.gop), **(codec_options or {})}
        self.next_index = start_index
        self.sent: dict[int, float] = {}
        self.sessions = 0  # how many times it connected (wrote its header)
        self._sessions_before = 0
        self.error: str | None = None  # why the last session failed
        self.ended: str | None = None  # how the last session ended: "done" | "stopped" | "error ..."
        self._source, self._frames_dir = source, None
        self._changed = threading.Condition()
        self._child: _Child | None = None

    @property
    def running(self) -> bool:
        return self._child is not None and self._child.alive

    def _source_arg(self) -> str | None:
        if self._source is None or isinstance(self._source, (str, Path)):
            return None if self._source is None else str(self._source)
        if self._frames_dir is None:  # frames go to the child as one .npy file, written once
            self._frames_dir = tempfile.TemporaryDirectory(prefix="publisher-")
            np.save(Path(self._frames_dir.name) / "frames.npy", np.stack(list(self._source)))
        return str(Path(self._frames_dir.name) / "frames.npy")

    def start(self) -> "Publisher":
        if self.running:
            raise RuntimeError("publisher already running")
        self.error = self.ended = None
        args = dict(url=self.url, source=self._source_arg(), fps=self.fps, size=self.size, loop=self.loop,
                    count=self.count, audio=self.audio, transport=self.transport,
                    codec_options=self.codec_options, start_index=self.next_index)
        self._sessions_before = self.sessions
        self._child = _python_child("publish", args, self._on_line)
        _track(self)
        return self

    def _on_line(self, line: str) -> None:
        word, _, rest = line.partition(" ")
        with self._changed:
            if word == "SENT":
                index, t = rest.split()
                self.sent[int(index)] = float(t)
                self.next_index = int(index) + 1
            elif word == "OPEN":
                self.sessions += 1
            elif word == "END":
                self.ended = rest
                if rest.startswith("error"):
                    self.error = rest[len("error "):]
            self._changed.notify_all()

    def wait_open(self, timeout: float = 10.0) -> None:
        """Wait until the session started last is connected (its header written)."""
        self._wait(lambda: self.sessions > self._sessions_before, timeout, "connect")

    def wait_sent(self, count: int, timeout: float = 10.0) -> None:
        """Wait until ``count`` frames have been sent in all (over all sessions)."""
        self._wait(lambda: len(self.sent) >= count, timeout, f"send {count} frames")

    def _wait(self, done: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        with self._changed:
            while not done():
                gone = self._child is None or self._child.output_done.is_set()
                if self.ended is not None or gone or time.monotonic() > deadline:
                    raise TimeoutError(f"publisher to {self.url} did not {what} (sent {len(self.sent)}, "
                                       f"ended: {self.ended}); log: {self.log()}")
                self._changed.wait(0.1)

    def wait_done(self, timeout: float = 30.0) -> str:
        """Wait for the session to end by itself (``count`` reached, source exhausted, or an error)."""
        if self._child is None or self._child.wait(timeout) is None:
            raise TimeoutError(f"publisher to {self.url} still running after {timeout:.0f} s")
        self.stop()
        return self.ended or "killed"

    def stop(self, abrupt: bool = False) -> None:
        """End the session: by default cleanly (RTSP TEARDOWN, trailer written); ``abrupt`` kills the
        process, so the connection just drops, like a camera losing power."""
        if self._child is not None and not self._child.proc.stdin.closed:
            self._child.stop(signal.SIGKILL if abrupt else signal.SIGTERM)
        _untrack(self)

    def restart(self, pause: float = 0.0, abrupt: bool = False) -> "Publisher":
        """Stop, wait ``pause`` seconds, connect again: indices carry on, timestamps start again at 0."""
        self.stop(abrupt)
        time.sleep(pause)
        return self.start()

    def log(self) -> str:
        return self._child.log() if self._child else ""

    def __enter__(self) -> "Publisher":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _source_frames(source: str | None, size: tuple[int, int], loop: bool) -> Iterator[np.ndarray]:
    while True:
        if source is None:
            k = 0
            while True:
                yield pattern_frame(k, *size)
                k += 1
        elif source.endswith(".npy"):
            yield from np.load(source, mmap_mode="r")
        else:
            with av.open(source) as clip:
                for frame in clip.decode(video=0):
                    yield frame.to_ndarray(format="rgb24")
        if not loop:
            return


def _publish(url: str, source: str | None, *, fps: int, size, loop: bool, count: int | None, audio: bool,
             transport: str, codec_options: dict, start_index: int, stop: threading.Event) -> str:
    """The publisher's loop, in its own process: one session, returns how it ended."""
    frames = _source_frames(source, size, loop)
    rgb = next(frames)
    fmt, options = output_format(url, transport)
    out = av.open(url, "w", format=fmt, options=options)
    try:
        video = out.add_stream("libx264", rate=fps, options=codec_options)
        video.height, video.width = rgb.shape[:2]
        video.pix_fmt = "yuv420p"
        tone = _Tone(out.add_stream("aac", rate=48000, layout="stereo")) if audio else None
        time_base = Fraction(1, fps)
        start, n = time.monotonic(), 0
        while count is None or n < count:
            frame = av.VideoFrame.from_ndarray(stamp_index(np.array(rgb), start_index + n), format="rgb24")
            frame.pts, frame.time_base = n, time_base
            if stop.wait(max(0.0, start + n / fps - time.monotonic())):
                break  # paced: frame n leaves n/fps after the first
            sent = time.monotonic()
            packets = video.encode(frame)
            out.mux(packets)
            if n == 0:
                _say("OPEN")  # the first mux connected (wrote the header)
            _say(f"SENT {start_index + n} {sent!r}")
            if tone:
                out.mux(tone.until((n + 1) / fps))
            n += 1
            rgb = next(frames, None)
            if rgb is None:
                break
        out.mux(video.encode(None))
        return "stopped" if stop.is_set() else "done"
    finally:
        out.close()


class _Tone:
    """A 440 Hz tone for the AAC track, encoded up to a given time."""

    def __init__(self, stream):
        self.stream, self.samples = stream, 0

    def until(self, seconds: float) -> list:
        packets = []
        rate, size = self.stream.codec_context.sample_rate, 1024
        while self.samples < seconds * rate:
            t = (self.samples + np.arange(size)) / rate
            wave = (0.2 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
            frame = av.AudioFrame.from_ndarray(np.stack([wave, wave]), format="fltp", layout="stereo")
            frame.sample_rate, frame.pts = rate, self.samples
            packets += self.stream.encode(frame)
            self.samples += size
        return packets


# ----------------------------------------------------------------------------------------------
# Readers

# Options that make FFmpeg open a live input without buffering or long probing (0.3 s instead of ~0.8 s
# to open an RTSP stream); the first picture still waits for the next keyframe.
LOW_DELAY = {"fflags": "nobuffer", "flags": "low_delay", "analyzeduration": "0", "probesize": "32"}


def input_options(url: str, listen: bool = False, listen_s: float = 30.0) -> dict:
    """Options a live input needs by scheme (RTSP over TCP; a UDP socket that keeps going on overrun).
    ``listen``: wait ``listen_s`` for one publisher to connect instead of connecting."""
    scheme = _scheme(url)
    if scheme == "rtsp":
        # listen_timeout must be set: its default (-1, "forever") fails at once with ERANGE in FFmpeg 8.1
        # (it is multiplied by 1000 into the TCP listener's option, whose minimum is -1)
        return ({"rtsp_flags": "listen", "listen_timeout": str(max(1, math.ceil(listen_s)))} if listen
                else {"rtsp_transport": "tcp"})
    if scheme == "udp":
        return {"overrun_nonfatal": "1", "fifo_size": "100000", "localaddr": HOST}
    if scheme == "rtmp" and listen:
        return {"listen": "1", "timeout": str(max(1, math.ceil(listen_s)))}
    return {}


@dataclass
class Received:
    index: int | None  # drawn in the picture; None when it does not read back (corrupt picture)
    pts: float | None  # seconds in the stream's time base; None when the stream gave none
    arrival: float  # time.monotonic() when decoded
    key: bool


@dataclass
class Capture:
    """What a reader decoded, in order, and why it stopped (``end``)."""
    started: float = field(default_factory=time.monotonic)  # when the reader began opening
    opened: float | None = None  # when the input was open
    frames: list[Received] = field(default_factory=list)
    audio_frames: int = 0
    decode_errors: int = 0
    streams: list[str] = field(default_factory=list)  # e.g. ["video:h264", "audio:aac"]
    end: str = ""  # "" while reading, then "frames" | "duration" | "eof" | "stopped" | "<Error>: message"

    @property
    def indices(self) -> list[int]:
        return [f.index for f in self.frames if f.index is not None]

    @property
    def unreadable(self) -> int:
        return sum(f.index is None for f in self.frames)

    def missing(self) -> list[int]:
        """Indices absent between the first and the last one decoded (drops)."""
        seen = self.indices
        return sorted(set(range(min(seen), max(seen) + 1)) - set(seen)) if seen else []

    def in_order(self) -> bool:
        """Indices strictly increasing: nothing repeated, nothing out of order."""
        seen = self.indices
        return all(b > a for a, b in zip(seen, seen[1:]))

    def pts_increasing(self, skip: int = 0) -> bool:
        """From frame ``skip`` on, every frame has a pts and they strictly increase."""
        pts = [f.pts for f in self.frames[skip:]]
        return None not in pts and all(b > a for a, b in zip(pts, pts[1:]))

    def first_frame_s(self) -> float | None:
        """Seconds from the reader's start to its first decoded picture."""
        return self.frames[0].arrival - self.started if self.frames else None

    def latencies(self, sent: dict[int, float]) -> list[float]:
        """Seconds from ``Publisher.sent`` to decoded, per frame (one clock for all processes)."""
        return [f.arrival - sent[f.index] for f in self.frames if f.index in sent]

    def summary(self) -> str:
        seen = self.indices
        span = f"{seen[0]}..{seen[-1]}" if seen else "none"
        return (f"{len(self.frames)} frames (indices {span}, {len(self.missing())} missing, "
                f"{self.unreadable} unreadable, in order: {self.in_order()}), {self.audio_frames} audio frames, "
                f"streams {self.streams}, end: {self.end or 'still reading'}")


def _read(src: str, capture: Capture, *, frames: int | None = None, duration: float | None = None,
          timeout: tuple[float, float] = (10.0, 5.0), options: dict | None = None, listen: bool = False,
          low_delay: bool = False, on_change: Callable[[str, object], None] = lambda kind, value: None) -> Capture:
    """Decode ``src`` into ``capture``; ``on_change`` hears each step (a child reports them to its parent)."""
    opts = {**input_options(src, listen, timeout[0]), **(LOW_DELAY if low_delay else {}), **(options or {})}
    deadline = capture.started + duration if duration is not None else None

    def finish(end: str) -> Capture:
        capture.end = end
        on_change("end", {"end": end, "decode_errors": capture.decode_errors})
        return capture

    try:
        container = av.open(src, options=opts, timeout=timeout)
    except Exception as e:  # noqa: BLE001 - recorded: a test asserts on what was received
        return finish(f"{type(e).__name__}: {e}")
    try:
        streams = list(container.streams.video[:1]) + list(container.streams.audio[:1])
        capture.opened, capture.streams = time.monotonic(), [f"{s.type}:{s.codec_context.name}" for s in streams]
        on_change("open", {"opened": capture.opened, "streams": capture.streams})
        for packet in container.demux(*streams):
            if deadline is not None and time.monotonic() >= deadline:
                return finish("duration")
            try:
                decoded = packet.decode()
            except av.error.InvalidDataError:
                capture.decode_errors += 1  # a damaged packet; a live reader keeps going
                continue
            for frame in decoded:
                if packet.stream.type == "audio":
                    capture.audio_frames += 1
                    on_change("audio", capture.audio_frames)
                    continue
                got = Received(read_index(frame), frame.time, time.monotonic(), frame.key_frame)
                capture.frames.append(got)
                on_change("frame", got)
            if frames is not None and len(capture.frames) >= frames:
                return finish("frames")
        return finish("eof")
    except Exception as e:  # noqa: BLE001 - read timeout (ExitError), connection reset, ...
        return finish(f"{type(e).__name__}: {e}")
    finally:
        container.close()


def read_frame_indices(src: str | Path, *, frames: int | None = None, duration: float | None = None,
                       timeout: tuple[float, float] = (10.0, 5.0), options: dict | None = None,
                       listen: bool = False, low_delay: bool = False) -> Capture:
    """Decode a stream (rtsp://, udp://, rtmp://, ...), file or HLS playlist in this process and
    return what each picture carries: index (``stamp_index``), pts, arrival time. Stops after
    ``frames`` pictures, ``duration`` seconds, at the end of the input, or on an error or a read
    waiting longer than ``timeout[1]`` (all recorded in ``Capture.end``, never raised: assert on the
    capture). For a reader running beside other work, use ``StreamReader``."""
    return _read(str(src), Capture(), frames=frames, duration=duration, timeout=timeout, options=options,
                 listen=listen, low_delay=low_delay)


def read_when_available(src: str | Path, *, frames: int, within: float = 15.0, pause: float = 0.2,
                        **kwargs) -> tuple[Capture, list[str]]:
    """``read_frame_indices`` again and again until a read yields pictures or ``within`` seconds
    pass, as a live reader reconnects (e.g. 404 from the relay until the publisher is back).
    Returns the last capture and how each earlier attempt ended."""
    deadline = time.monotonic() + within
    failures: list[str] = []
    while True:
        capture = read_frame_indices(src, frames=frames, **kwargs)
        if capture.frames or time.monotonic() + pause > deadline:
            return capture, failures
        failures.append(capture.end)
        time.sleep(pause)


class StreamReader:
    """``read_frame_indices`` in a helper process: ``capture`` fills while the test goes on.
    ``listen=True`` makes it the server that one publisher connects to (RTSP, RTMP)."""

    def __init__(self, src: str | Path, *, frames: int | None = None, duration: float | None = None,
                 timeout: tuple[float, float] = (10.0, 5.0), options: dict | None = None,
                 listen: bool = False, low_delay: bool = False):
        self.src = str(src)
        self._args = dict(src=self.src, frames=frames, duration=duration, timeout=list(timeout),
                          options=options, listen=listen, low_delay=low_delay)
        self.capture = Capture()
        self._changed = threading.Condition()
        self._child: _Child | None = None

    @property
    def done(self) -> bool:
        return bool(self.capture.end)

    def start(self) -> "StreamReader":
        self.capture = Capture()
        self._child = _python_child("read", self._args, self._on_line)
        _track(self)
        return self

    def _on_line(self, line: str) -> None:
        kind, value = json.loads(line)
        c = self.capture
        with self._changed:
            if kind == "start":
                c.started = value
            elif kind == "open":
                c.opened, c.streams = value["opened"], value["streams"]
            elif kind == "frame":
                c.frames.append(Received(*value))
            elif kind == "audio":
                c.audio_frames = value
            elif kind == "end":
                c.end, c.decode_errors = value["end"], value["decode_errors"]
            self._changed.notify_all()

    def _wait(self, done: Callable[[], bool], timeout: float, what: str) -> Capture:
        deadline = time.monotonic() + timeout
        with self._changed:
            while not done():
                if self.capture.end or time.monotonic() > deadline or self._child.output_done.is_set():
                    raise TimeoutError(f"reader of {self.src} did not {what}: {self.capture.summary()}; "
                                       f"log: {self._child.log()[-1000:]}")
                self._changed.wait(0.1)
        return self.capture

    def wait_open(self, timeout: float = 10.0) -> Capture:
        return self._wait(lambda: self.capture.opened is not None, timeout, "open its input")

    def wait_frames(self, count: int, timeout: float = 10.0) -> Capture:
        """Wait until ``count`` pictures are decoded (TimeoutError, with what came, otherwise)."""
        return self._wait(lambda: len(self.capture.frames) >= count, timeout, f"decode {count} frames")

    def wait_done(self, timeout: float = 30.0) -> Capture:
        """Wait for the reader to end by itself (frames or duration reached, EOF, error, timeout)."""
        if self._child.wait(timeout) is None:
            raise TimeoutError(f"reader of {self.src} still running after {timeout:.0f} s: {self.capture.summary()}")
        self.stop()
        return self.capture

    def stop(self) -> Capture:
        """Stop reading now (the process is terminated); returns what was captured."""
        if self._child is not None and not self._child.proc.stdin.closed:
            self._child.stop()
        if not self.capture.end:
            self.capture.end = "stopped"
        _untrack(self)
        return self.capture

    def __enter__(self) -> "StreamReader":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class _ListenReceiver(StreamReader):
    scheme = ""

    def __init__(self, port: int | None = None, path: str = "live/cam", timeout=(30.0, 5.0), **kwargs):
        self.port = port or free_port("tcp")
        self.url = f"{self.scheme}://{HOST}:{self.port}/{path}"
        super().__init__(self.url, listen=True, timeout=timeout, **kwargs)

    def start(self) -> "_ListenReceiver":
        super().start()
        wait_port(self.port, "tcp", alive=lambda: self._child.alive)
        return self


class RtspListenReceiver(_ListenReceiver):
    """An RTSP server for exactly one publisher (FFmpeg's ``rtsp_flags=listen``), to test an RTSP
    *output*: publish to ``url``; ``capture`` fills with what arrives; it ends with EOF when the
    publisher leaves. ``start()`` returns once it listens (a publisher that comes earlier is refused)."""
    scheme = "rtsp"


class RtmpListenReceiver(_ListenReceiver):
    """An RTMP server for exactly one publisher (FFmpeg's rtmp ``listen``), to test an RTMP *output*
    (FLV): publish to ``url``. When the publisher leaves the capture ends with an I/O error, not EOF."""
    scheme = "rtmp"


class UdpReceiver(StreamReader):
    """Receives MPEG-TS on ``udp://127.0.0.1:PORT``: send to ``url``. UDP has no end: the capture ends
    on the read timeout after the sender stops. ``start()`` returns once the socket is bound
    (datagrams sent earlier are lost)."""

    def __init__(self, port: int | None = None, timeout=(30.0, 3.0), **kwargs):
        self.port = port or free_port("udp")
        self.url = udp_url(self.port)
        super().__init__(f"udp://{HOST}:{self.port}", timeout=timeout, **kwargs)

    def start(self) -> "UdpReceiver":
        super().start()
        wait_port(self.port, "udp", alive=lambda: self._child.alive)
        return self


def udp_url(port: int) -> str:
    """Where to send MPEG-TS over UDP: 7 TS packets per datagram, the usual size."""
    return f"udp://{HOST}:{port}?pkt_size=1316"


# ----------------------------------------------------------------------------------------------
# Entry point of the helper processes: python streams.py publish|read '<json arguments>'

def _main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("command", choices=("publish", "read"))
    ap.add_argument("args", help="JSON object of keyword arguments")
    ns = ap.parse_args()
    args = json.loads(ns.args)
    if ns.command == "publish":
        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())  # clean end: TEARDOWN / trailer
        _exit_when_parent_goes(stop.set)
        try:
            _say("END " + _publish(args.pop("url"), args.pop("source"), stop=stop, **args))
        except Exception as e:  # noqa: BLE001 - reported to the parent, which raises or asserts
            _say(f"END error {type(e).__name__}: {e}")
    else:
        _exit_when_parent_goes(lambda: os._exit(0))
        capture = Capture()
        print(json.dumps(["start", capture.started]), flush=True)

        def report(kind, value):
            if kind == "frame":
                value = [value.index, value.pts, value.arrival, value.key]
            print(json.dumps([kind, value]), flush=True)
        args["timeout"] = tuple(args["timeout"])
        _read(args.pop("src"), capture, on_change=report, **args)


if __name__ == "__main__":
    _main()
