"""The live source: a camera or stream (rtsp://, rtmp://, srt://, udp://, http(s):// HLS), or a
local file played at its own pace (``--realtime``, ``--loop``), as frames on our own clock.

One reader thread owns the input: it opens it, decodes, and hands frames over through a small
queue where the newest frame wins (a job that falls behind sees the latest picture, and the
``dropped`` counter says how many it never saw). The job's threads never touch the input, so
nothing it does can block them:

- every open and read has a timeout (PyAV's interrupt callback): an unreachable camera costs
  ``open_timeout_s`` per try, a camera that goes silent ``stall_s``;
- a lost or stalled input is reopened with backoff (1 s doubling to ``backoff_max_s``) until the
  job is cancelled; reconnects and stalls are counted, and the first frame after a reconnect is
  marked ``new_session`` (tracks restart);
- timestamps are rebased onto one monotonic clock (1/90000 s) that keeps running across
  reconnects: within a session frames keep the source's own spacing, anchored at the arrival
  of its first frame (re-anchored if the source's clock drifts from ours by over a second);
- audio (and other copied streams) pass through on the same clock; after a reconnect only
  streams that look the same as the first session's (codec, rate, channels) are passed on;
- a session whose picture size changed is scaled to the first session's size (the outputs
  were opened for it).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections import deque
from fractions import Fraction
from pathlib import Path
from typing import Callable, Iterator
from urllib.parse import urlsplit

import av

from configs.errors import Cancelled, InputError
from streamer.io.probe import MediaError, VideoInfo, describe, open_input, video_stream
from streamer.io.source import DecodedFrame, copied_streams
from streamer.serve.connection import redact

log = logging.getLogger(__name__)

LIVE_TIME_BASE = Fraction(1, 90000)  # the clock every live frame and packet is stamped on
QUEUE_FRAMES = 3  # frames waiting for the job; more would only add latency
QUEUE_PACKETS = 500  # copied-stream packets waiting (a few seconds of audio)
REANCHOR_S = 1.0  # source clock vs ours: further apart than this and the session is re-anchored
# Network protocols a live input may use; never "file": a playlist fetched over the network
# must not make FFmpeg read local files.
LIVE_PROTOCOLS = "rtsp,rtsps,rtp,srtp,udp,tcp,tls,rtmp,rtmps,rtmpt,srt,http,https,httpproxy,crypto,hls"
_END = object()


class LiveSource:
    def __init__(self, url: str, *, transport: str = "tcp", realtime: bool = False, loop: bool = False,
                 stall_s: float = 5.0, open_timeout_s: float = 5.0, backoff_max_s: float = 30.0,
                 stop: threading.Event | None = None):
        from streamer.jobs.live import is_stream_url

        self.url = url
        self.network = is_stream_url(url)
        self.name = redact(url) if self.network else url
        if not self.network and not realtime:
            raise InputError(f"{url} is a file: a live job plays a file only with --realtime (paced at its own "
                             "frame rate); to restore a file as fast as possible use gpen-stream restore")
        if loop and self.network:
            raise InputError("--loop repeats a local file; a stream is reconnected when it ends")
        self.transport, self.realtime, self.loop = transport, realtime, loop
        self.stall_s, self.open_timeout_s, self.backoff_max_s = stall_s, open_timeout_s, backoff_max_s
        self.stop = stop or threading.Event()
        self.info: VideoInfo | None = None
        self.copied: list = []
        self._signatures: dict[int, tuple] = {}  # copied stream index -> what it looks like
        self.frames_in = self.dropped = self.reconnects = self.stalls = 0
        self._frames: deque = deque()
        self._packets: deque = deque(maxlen=QUEUE_PACKETS)
        self._ready = threading.Condition()
        self._halt = threading.Event()  # close(): the reader stops
        self._described = threading.Event()
        self._error: BaseException | None = None
        self._clock0 = time.monotonic()
        self._last_pts = -1
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ the job's side

    def open(self) -> VideoInfo:
        """Start reading; returns once the input was opened and described (retrying a network
        input until it answers). Raises ``Cancelled`` if the job is cancelled first."""
        self._thread = threading.Thread(target=self._read, name="live-input", daemon=True)
        self._thread.start()
        while not self._described.wait(0.1):
            if self.stop.is_set():
                self._halt.set()
                raise Cancelled("cancelled before the input could be opened")
            if not self._thread.is_alive():
                break
        if self.info is None:
            raise self._error or MediaError(f"{self.name}: the input ended before its first frame")
        return self.info

    def frames(self, on_packet: Callable[[av.Packet | None], None]) -> Iterator[DecodedFrame]:
        index = 0
        while True:
            with self._ready:
                while not self._frames and not self._halt.is_set():
                    self._ready.wait(0.1)
                if self._halt.is_set() and not self._frames:
                    return
                item = self._frames.popleft()
                packets = list(self._packets)
                self._packets.clear()
            for packet in packets:
                on_packet(packet)
            if item is _END:
                if self._error is not None:
                    raise self._error
                on_packet(None)
                return
            item.index = index
            index += 1
            yield item

    def interrupt(self) -> None:
        """The job is stopping: wake ``frames()`` and stop reading."""
        self._halt.set()

    def summary(self) -> dict[str, int]:
        return {"frames_in": self.frames_in, "dropped": self.dropped, "reconnects": self.reconnects,
                "stalls": self.stalls}

    def close(self) -> None:
        self._halt.set()
        if self._thread is not None:
            # A reader inside a network open or read returns at its timeout at the latest, then
            # closes its input itself; a stopping job does not wait that long for it.
            self._thread.join(1.0)
            if self._thread.is_alive():
                log.debug("%s: the input reader stops at its next timeout", self.name)

    # ------------------------------------------------------------------ the reader thread

    def _stopping(self) -> bool:
        return self._halt.is_set() or self.stop.is_set()

    def _read(self) -> None:
        backoff, sessions = 1.0, 0
        try:
            while not self._stopping():
                try:
                    container = self._connect()
                except (av.error.FFmpegError, OSError) as exc:
                    if self._stopping():
                        break
                    if not self.network:
                        raise MediaError(f"cannot open {self.name}: {exc}") from None
                    log.warning("cannot open %s (%s); retrying in %.0f s", self.name, _short(exc), backoff)
                    if self._halt.wait(backoff) or self.stop.is_set():
                        break
                    backoff = min(2 * backoff, self.backoff_max_s)
                    continue
                if sessions and self.network:
                    self.reconnects += 1
                    log.info("%s: reconnected (%d so far)", self.name, self.reconnects)
                try:
                    got, why = self._session(container, first=sessions == 0)
                finally:
                    container.close()
                sessions += 1
                if got:
                    backoff = 1.0
                if self._stopping():
                    break
                if not self.network:
                    if not self.loop:
                        break  # the file ended: so does the job
                    continue
                log.warning("%s: %s; reconnecting", self.name, why)
                if not got and self._halt.wait(backoff):
                    break
        except BaseException as exc:  # handed to the job by open() or frames()
            self._error = exc if isinstance(exc, InputError) else MediaError(f"{self.name}: {exc}")
        finally:
            self._described.set()
            with self._ready:
                self._frames.append(_END)
                self._ready.notify_all()

    def _connect(self):
        if not self.network:
            return open_input(Path(self.url))
        scheme = urlsplit(self.url).scheme.lower()
        options = {"protocol_whitelist": LIVE_PROTOCOLS, "fflags": "nobuffer", "flags": "low_delay"}
        if scheme in ("rtsp", "rtsps"):
            options["rtsp_transport"] = self.transport
        elif scheme == "udp":
            options.update(overrun_nonfatal="1", fifo_size="100000")
        return av.open(self.url, options=options, timeout=(self.open_timeout_s, self.stall_s))

    def _session(self, container, *, first: bool) -> tuple[bool, str]:
        """Read one opened input until it ends, stalls or we stop. Returns (any frame?, why it ended)."""
        video = video_stream(container)
        if video is None:
            raise MediaError(f"{self.name} has no video stream")
        if first:
            self._describe(container)
        copied = [s for s in copied_streams(container, video)
                  if self._signatures.get(s.index) == _signature(s)]
        if not first and len(copied) < len(self._signatures):
            log.warning("%s: after reconnecting, stream(s) %s no longer look the same; not copied", self.name,
                        ", ".join(f"#{i}" for i in self._signatures if i not in {s.index for s in copied}))
        anchor: tuple[float, float] | None = None  # (our clock, the source's clock) at the session's start
        paced_from: tuple[float, float] | None = None  # realtime files: (monotonic, source seconds)
        last_frame = time.monotonic()
        new_session, got = True, False
        try:
            for packet in container.demux(video, *copied):
                if self._stopping():
                    return got, "stopped"
                if time.monotonic() - last_frame > self.stall_s:
                    self.stalls += 1
                    return got, f"no picture for {self.stall_s:g} s"
                if packet.stream is not video:
                    if anchor is not None and packet.size:
                        self._pass_packet(packet, anchor)
                    continue
                for frame in packet.decode():
                    src_s = float(frame.pts * frame.time_base) if frame.pts is not None and frame.time_base else None
                    if self.realtime and src_s is not None:
                        paced_from = paced_from or (time.monotonic(), src_s)
                        if self._halt.wait(max(0.0, paced_from[0] + src_s - paced_from[1] - time.monotonic())):
                            return got, "stopped"
                    arrived = time.monotonic()
                    last_frame = arrived
                    now_s = arrived - self._clock0
                    if anchor is None or src_s is None or abs(anchor[0] + src_s - anchor[1] - now_s) > REANCHOR_S:
                        anchor = (now_s, src_s if src_s is not None else 0.0)
                    clock_s = anchor[0] + (src_s - anchor[1] if src_s is not None else 0.0)
                    self._hand_over(self._fit(frame), clock_s, arrived, new_session)
                    new_session, got = False, True
        except av.error.EOFError:
            return got, "the stream ended"
        except av.error.FFmpegError as exc:
            if self._stopping():
                return got, "stopped"
            if got and "exit" in str(exc).lower():  # the read timeout (interrupt callback)
                self.stalls += 1
                return got, f"no data for {self.stall_s:g} s"
            return got, f"read failed ({_short(exc)})"
        return got, "the stream ended"

    def _describe(self, container) -> None:
        if self.network:
            info = describe(container, self.name)  # costs the stream's first picture
        else:  # a file is described from a copy of its own, to play it from its first frame
            with open_input(Path(self.url)) as other:
                info = describe(other, self.name)
        rate = info.rate if info.rate and 1 <= info.rate <= 240 else None  # RTSP often guesses 90000
        self.info = dataclasses.replace(
            info, time_base=LIVE_TIME_BASE, rate=rate, frames=0, duration_s=None, stream_duration_s=None,
            container_duration_s=None, start_s=0.0)
        video = video_stream(container)
        self.copied = copied_streams(container, video)
        self._signatures = {s.index: _signature(s) for s in self.copied}
        self._described.set()

    def _fit(self, frame: av.VideoFrame) -> av.VideoFrame:
        info = self.info
        if (frame.width, frame.height, frame.format.name) != (info.width, info.height, info.pix_fmt):
            frame = frame.reformat(width=info.width, height=info.height, format=info.pix_fmt)
        return frame

    def _hand_over(self, frame: av.VideoFrame, clock_s: float, arrived: float, new_session: bool) -> None:
        pts = max(round(clock_s / LIVE_TIME_BASE), self._last_pts + 1)
        self._last_pts = pts
        item = DecodedFrame(0, frame, pts, float(pts * LIVE_TIME_BASE), arrived=arrived, new_session=new_session)
        self.frames_in += 1
        with self._ready:
            if len(self._frames) >= QUEUE_FRAMES:  # the job is behind: the newest picture wins
                dropped = self._frames.popleft()
                self.dropped += 1
                if dropped.new_session:  # the restart of the tracks must not be lost with it
                    item.new_session = True
            self._frames.append(item)
            self._ready.notify_all()

    def _pass_packet(self, packet: av.Packet, anchor: tuple[float, float]) -> None:
        ts = packet.pts if packet.pts is not None else packet.dts
        if ts is None or not packet.time_base:
            return
        clock_s = anchor[0] + float(ts * packet.time_base) - anchor[1]
        if clock_s < 0:
            return
        # on our clock, measured from the stream's start the way the pipeline reads it (packet_offset_s)
        rebased = round(clock_s / packet.time_base) + (packet.stream.start_time or 0)
        if packet.dts is not None and packet.pts is not None:
            packet.dts = rebased - (packet.pts - packet.dts)
        else:
            packet.dts = rebased
        packet.pts = rebased
        with self._ready:
            self._packets.append(packet)


def _signature(stream) -> tuple:
    cc = stream.codec_context
    return (stream.type, cc.name, getattr(cc, "sample_rate", None), getattr(cc, "channels", None))


def _short(exc: BaseException) -> str:
    return str(exc).split(";")[0].strip()
