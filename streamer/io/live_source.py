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
  of its first frame (re-anchored if the source's clock drifts from ours by over a second,
  never backwards: the outputs' timestamps must keep increasing);
- audio (and other copied streams) pass through on the same clock, as packets of their own
  (the input they came from is closed at its session's end, they may still be queued), each
  stream's timestamps only ever increasing; after a reconnect only streams that look the same
  as the first session's (codec, rate, channels) are passed on;
- a packet the decoder refuses costs that packet (counted as ``corrupt``), not the session;
- a session whose picture size changed is scaled to the first session's size (the outputs
  were opened for it).
"""

from __future__ import annotations

import dataclasses
import io
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
# Failures no retry can mend: the URL's protocol, its demuxer or its codec is not in this FFmpeg.
FATAL_INPUT_ERRORS = (av.error.ProtocolNotFoundError, av.error.DemuxerNotFoundError, av.error.DecoderNotFoundError,
                      av.error.OptionNotFoundError)


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
        self.copied: list = []  # the copied streams as the outputs see them: see _describe()
        self._templates = None  # the never-started container that holds them
        self._copied_as: dict[int, object] = {}  # input stream index -> its stream in self.copied
        self._signatures: dict[int, tuple] = {}  # input stream index -> what it looks like
        self._last_dts: dict[int, int] = {}  # input stream index -> the last dts passed on
        self.frames_in = self.dropped = self.reconnects = self.stalls = self.corrupt = 0
        self._frames: deque = deque()
        self._packets: deque = deque(maxlen=QUEUE_PACKETS)
        self._ready = threading.Condition()
        self._halt = threading.Event()  # close(): the reader stops
        self._described = threading.Event()
        self._error: BaseException | None = None
        self._clock0: float | None = None  # our clock's zero: the arrival of the first frame
        self._next_due: float | None = None  # realtime files: when the frame after the last is due (across loops)
        self._last_pts = -1
        self.last_arrival = 0.0  # time.monotonic() of the latest frame from the input
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
            if self.stop.is_set() and not isinstance(self._error, InputError):  # the reader saw the cancel first
                raise Cancelled("cancelled before the input could be opened")
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
                "stalls": self.stalls, "corrupt": self.corrupt}

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
        backoff = 1.0
        try:
            while not self._stopping():
                try:
                    container = self._connect()
                except FATAL_INPUT_ERRORS as exc:
                    raise MediaError(f"cannot open {self.name}: {exc}") from None
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
                if self.info is not None and self.network:
                    self.reconnects += 1
                    log.info("%s: reconnected (%d so far)", self.name, self.reconnects)
                try:
                    got, why = self._session(container, first=self.info is None)
                except MediaError as exc:  # a stream that answered with something else: try again
                    if not self.network:
                        raise
                    got, why = False, str(exc)
                finally:
                    container.close()
                if got:
                    backoff = 1.0
                if self._stopping():
                    break
                if not self.network and not self.loop:
                    break  # the file ended: so does the job
                if self.network:
                    log.warning("%s: %s; reconnecting", self.name, why)
                if not got:  # nothing came: do not spin on an input that opens but yields nothing
                    if self._halt.wait(backoff) or self.stop.is_set():
                        break
                    backoff = min(2 * backoff, self.backoff_max_s)
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
                    if anchor is not None and packet.size and packet.stream.index in self._copied_as:
                        self._pass_packet(packet, anchor)
                    continue
                try:
                    frames = packet.decode()
                except av.error.InvalidDataError as exc:  # one damaged packet: the next keyframe mends it
                    self.corrupt += 1
                    log.debug("%s: a packet could not be decoded (%s)", self.name, _short(exc))
                    continue
                for frame in frames:
                    src_s = float(frame.pts * frame.time_base) if frame.pts is not None and frame.time_base else None
                    if self.realtime and src_s is not None:
                        # a loop's first frame is due one frame after the last one of the loop before
                        paced_from = paced_from or (max(time.monotonic(), self._next_due or 0.0), src_s)
                        due = paced_from[0] + src_s - paced_from[1]
                        if self._halt.wait(max(0.0, due - time.monotonic())):
                            return got, "stopped"
                        self._next_due = due + _frame_s(frame, self.info.rate)
                    arrived = time.monotonic()
                    last_frame = arrived
                    if self._clock0 is None:
                        self._clock0 = arrived
                    now_s = arrived - self._clock0
                    if anchor is None or src_s is None or abs(anchor[0] + src_s - anchor[1] - now_s) > REANCHOR_S:
                        # forwards only: what was already handed out keeps its place on the clock
                        anchor = (max(now_s, float(self._last_pts * LIVE_TIME_BASE)),
                                  src_s if src_s is not None else 0.0)
                    clock_s = anchor[0] + (src_s - anchor[1] if src_s is not None else 0.0)
                    self._hand_over(self._fit(frame), clock_s, arrived, new_session)
                    new_session, got = False, True
        except av.error.EOFError:
            return got, "the stream ended"
        except FATAL_INPUT_ERRORS as exc:
            raise InputError(f"{self.name}: {exc}") from None  # not a MediaError: that one is retried
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
            info, time_base=LIVE_TIME_BASE, rate=rate, frames=0, duration_s=None, stream_end_s=None,
            container_end_s=None, start_s=0.0)
        video = video_stream(container)
        # The outputs add these streams from templates that must outlive this input (closed when
        # its session ends): copies in a container that is never started, kept for the job.
        self._templates = av.open(io.BytesIO(), "w", format="matroska")
        for s in copied_streams(container, video):
            try:
                self._copied_as[s.index] = self._templates.add_stream_from_template(s)
            except (ValueError, av.error.FFmpegError) as exc:
                log.warning("%s: not copying %s stream #%d (%s)", self.name, s.type, s.index, exc)
                continue
            self._signatures[s.index] = _signature(s)
        self.copied = list(self._copied_as.values())
        self._described.set()

    def _fit(self, frame: av.VideoFrame) -> av.VideoFrame:
        info = self.info
        if (frame.width, frame.height, frame.format.name) != (info.width, info.height, info.pix_fmt):
            frame = frame.reformat(width=info.width, height=info.height, format=info.pix_fmt)
        return frame

    def _hand_over(self, frame: av.VideoFrame, clock_s: float, arrived: float, new_session: bool) -> None:
        pts = max(round(clock_s / LIVE_TIME_BASE), self._last_pts + 1)
        self._last_pts = pts
        self.last_arrival = arrived
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
        """Queue a copy of ``packet`` stamped on our clock (its own time base), for its stream in
        ``self.copied``: the pipeline reads its offset from that stream's start, which is 0."""
        ts = packet.pts if packet.pts is not None else packet.dts
        if ts is None or not packet.time_base:
            return
        clock_s = anchor[0] + float(ts * packet.time_base) - anchor[1]
        if clock_s < 0:
            return
        index = packet.stream.index
        pts = round(clock_s / packet.time_base)
        dts = pts - (packet.pts - packet.dts) if packet.dts is not None and packet.pts is not None else pts
        if dts <= self._last_dts.get(index, -1 << 62):  # a muxer refuses timestamps that go back
            return
        self._last_dts[index] = dts
        mine = av.Packet(bytes(packet))
        mine.pts, mine.dts, mine.time_base = pts, dts, packet.time_base
        mine.is_keyframe = packet.is_keyframe
        mine.stream = self._copied_as[index]
        with self._ready:
            self._packets.append(mine)


def _signature(stream) -> tuple:
    cc = stream.codec_context
    return (stream.type, cc.name, getattr(cc, "sample_rate", None), getattr(cc, "channels", None))


def _short(exc: BaseException) -> str:
    return str(exc).split(";")[0].strip()


def _frame_s(frame, rate: float | None) -> float:
    """How long a decoded frame is shown: its own duration, else one frame at ``rate``."""
    if frame.duration and frame.time_base:
        return float(frame.duration * frame.time_base)
    return 1.0 / rate if rate else 0.0
