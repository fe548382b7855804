"""Live outputs: publish to a media server (``rtsp://``, ``rtmp://``, ``srt://``), send MPEG-TS
over ``udp://``, keep a rolling HLS window on disk (``.m3u8``), or record (``.mkv``, ``.ts``,
``.mp4``, fragmented so a cut-off file plays; ``segment_time_s`` splits a recording into files
named by their start time). An existing recording is never overwritten: a new one goes beside it.

Each output encodes and writes in its own thread behind a small queue, so a slow disk or a
media server that went away never holds the job (or the other outputs) up: when the queue is
full the oldest entry goes and ``dropped`` counts it. A network output that fails is reopened
with backoff (1 s doubling to 30 s) while the job goes on; frames sent meanwhile are dropped.
A file output that fails (disk full) fails the job.

An output that holds a connection to a media server (RTSP, RTMP, SRT) is published from a child
process (``streamer.io.publisher``: PyAV can bound neither the connect nor a write, and holds
the GIL while connecting): this thread encodes into a pipe to it, and a server that never
answers or stops reading costs that output ``CONNECT_TIMEOUT_S`` and a reconnect, never the job.
UDP waits on no peer and is written here.

Ending is the same whether the job was cancelled or its input ended: the encoder is flushed
and the files are closed, so a recording or an HLS playlist is playable to its last frame
(a live output has no "nothing was written" state to go back to: what was sent was seen).

Encoding is tuned for live pictures: x264 with ``tune=zerolatency``, no B-frames, one
keyframe a second (HLS segments and late joiners start there) and one thread per picture
(zerolatency's sliced threads come out corrupted through some RTSP relays).
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import threading
import time
from collections import deque
from pathlib import Path
from urllib.parse import urlsplit

import av

from configs.errors import InputError
from streamer.io.probe import MediaError, VideoInfo
from streamer.io.publisher import PIPE_FORMAT, PIPE_MUX_OPTIONS, Child, ChildFailed
from streamer.io.sink import DEFAULT_CODEC, add_video_stream, output_pix_fmt
from streamer.serve.connection import redact

log = logging.getLogger(__name__)

QUEUE_ITEMS = 16  # frames (and packets) waiting for one output
CONNECT_TIMEOUT_S = 5.0  # connecting to a media server, and each write to it
BACKOFF_MAX_S = 30.0
CLOSE_WAIT_S = 5.0  # flushing and closing an output at the end
PUBLISH_CLOSE_S = 1.0  # a media server's share of it: the end of the stream, then the child is killed
RECORDING_MUXERS = {".mkv": "matroska", ".ts": "mpegts", ".mp4": "mp4"}
NETWORK_MUXERS = {"rtsp": "rtsp", "rtsps": "rtsp", "rtmp": "flv", "rtmps": "flv", "srt": "mpegts", "udp": "mpegts"}
PUBLISHED = {"rtsp", "rtsps", "rtmp", "rtmps", "srt"}  # connected to a server: from a child process
X264_LIVE = {"tune": "zerolatency", "x264-params": "sliced-threads=0", "bf": "0"}
_CLOSE = object()
# Failures no reconnect can mend: this FFmpeg lacks the protocol, the muxer or the encoder.
FATAL_OUTPUT_ERRORS = (av.error.ProtocolNotFoundError, av.error.MuxerNotFoundError, av.error.EncoderNotFoundError,
                       av.error.OptionNotFoundError)


def open_sink(target: str, *, codec: str | None, crf: float, preset: str, segment_time_s: float | None = None,
              hls_time_s: float = 2.0, hls_list_size: int = 6, transport: str = "tcp") -> "StreamSink":
    """The live output for ``target`` (a URL or a path); checks what can be checked at once."""
    scheme = urlsplit(target).scheme.lower() if "://" in target else ""
    if scheme:
        if scheme not in NETWORK_MUXERS:
            raise InputError(f"live output {redact(target)}: {scheme}:// is not an output gpen-stream can publish to "
                             f"(use {', '.join(s + '://' for s in NETWORK_MUXERS)}, a .m3u8 playlist or a recording)")
        options = {"rtsp_transport": transport} if NETWORK_MUXERS[scheme] == "rtsp" else {}
        if scheme == "udp" and "pkt_size=" not in target:  # the udp protocol's option: it goes in the URL
            target += ("&" if "?" in target else "?") + "pkt_size=1316"  # 7 TS packets: a datagram, not fragmented
        return StreamSink(target, NETWORK_MUXERS[scheme], options, codec=codec, crf=crf, preset=preset, network=True,
                          published=scheme in PUBLISHED)
    path = Path(target)
    if not path.parent.is_dir():
        raise MediaError(f"live output folder does not exist: {path.parent}")
    suffix = path.suffix.lower()
    if suffix == ".m3u8":
        options = {"hls_time": f"{hls_time_s:g}", "hls_list_size": str(hls_list_size),
                   # readers never see a half-written segment or playlist; old segments are removed
                   "hls_flags": "delete_segments+temp_file+independent_segments",
                   "hls_segment_filename": str(path.with_name(path.stem + "-%06d.ts"))}
        return StreamSink(str(path), "hls", options, codec=codec, crf=crf, preset=preset, gop_s=min(1.0, hls_time_s))
    if suffix not in RECORDING_MUXERS:
        raise MediaError(f"live output {path}: use a URL (rtsp://, rtmp://, srt://, udp://), an HLS playlist "
                         f"(.m3u8) or a recording ({', '.join(RECORDING_MUXERS)})")
    muxer = RECORDING_MUXERS[suffix]
    options = {"movflags": "frag_keyframe+empty_moov+default_base_moof"} if muxer == "mp4" else {}
    if segment_time_s:  # files named by their start time, name-20261124-010203.mkv: a restart overwrites none
        options = {"segment_time": f"{segment_time_s:g}", "segment_format": muxer, "reset_timestamps": "1",
                   "strftime": "1",
                   **({"segment_format_options": "movflags=frag_keyframe+empty_moov"} if muxer == "mp4" else {})}
        return StreamSink(str(path.with_name(path.stem + "-%Y%m%d-%H%M%S" + path.suffix)), "segment", options,
                          codec=codec, crf=crf, preset=preset)
    return StreamSink(str(_free_recording(path)), muxer, options, codec=codec, crf=crf, preset=preset)


def _free_recording(path: Path) -> Path:
    """``path``, or when an earlier recording is there (a restarted job) a name beside it,
    ``name-YYYYmmdd-HHMMSS[-N].mkv``: created here, exclusively, so neither a restart within
    the same second nor another job can take it too."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for n in itertools.count():
        candidate = path if n == 0 else path.with_name(f"{path.stem}-{stamp}{'' if n == 1 else f'-{n - 1}'}"
                                                       f"{path.suffix}")
        try:
            os.close(os.open(candidate, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:
            continue
        except OSError as exc:
            raise MediaError(f"cannot write {candidate}: {exc.strerror}") from None
        if n:
            log.warning("%s exists: recording to %s instead", path, candidate.name)
        return candidate
    raise AssertionError("unreachable")


class StreamSink:
    """One live output (see the module's notes). Implements the pipeline's ``Sink``."""

    def __init__(self, target: str, muxer: str, options: dict[str, str], *, codec: str | None, crf: float,
                 preset: str, network: bool = False, published: bool = False, gop_s: float = 1.0):
        self.target, self.muxer, self.options = target, muxer, options
        self.name = redact(target) if network else target
        self.codec, self.crf, self.preset = codec or DEFAULT_CODEC, crf, preset
        self.network, self.published, self.gop_s = network, published, gop_s
        self.child: Child | None = None  # the publishing process (published outputs)
        self.dropped = self.reconnects = 0
        self.error: BaseException | None = None
        self._queue: deque = deque()
        self._ready = threading.Condition()
        self._thread: threading.Thread | None = None
        self.container = None
        self._next_try = 0.0
        self._backoff = 1.0

    # ------------------------------------------------------------------ the job's side

    def open(self, info: VideoInfo, copied: list) -> str:
        self.info, self.copied = info, copied
        self.pix_fmt = output_pix_fmt(info, self.codec)
        if not self.network:  # a file that cannot be written fails the job now, not later
            try:
                self._connect()
            except FATAL_OUTPUT_ERRORS as exc:
                raise MediaError(f"cannot write {self.name}: {exc}") from None
        self._thread = threading.Thread(target=self._write_loop, name=f"output {self.name}", daemon=True)
        self._thread.start()
        return self.pix_fmt

    def write(self, frame: av.VideoFrame, pts: int) -> None:
        self._put(("frame", frame, pts))

    def copy(self, packet: av.Packet) -> None:
        self._put(("packet", packet, None))

    def commit(self) -> Path | None:
        self.abort()
        if self.error is not None:
            raise self.error
        return None if self.network else Path(self.target)

    def abort(self) -> None:
        """Flush and close (ending is the same whether the job was cancelled or not)."""
        self.request_close()
        self.await_close(time.monotonic() + CLOSE_WAIT_S)

    def request_close(self) -> None:
        """Flush and close once what is queued is written (the output's thread does it)."""
        if self._thread is None:
            self._close_container(flush=False)
            return
        with self._ready:
            self._queue.append(_CLOSE)
            self._ready.notify()

    def await_close(self, deadline: float) -> None:
        if self._thread is None:
            return
        self._thread.join(max(0.0, deadline - time.monotonic()))
        if self._thread.is_alive():
            log.warning("%s: the output did not close within %.0f s", self.name, CLOSE_WAIT_S)
            if not self.network and self.error is None:  # a recording that may lack its end
                self.error = MediaError(f"{self.name}: writing did not finish within {CLOSE_WAIT_S:g} s")
        self._thread = None

    # ------------------------------------------------------------------ the output's thread

    def _put(self, item) -> None:
        if self.error is not None:
            raise self.error
        with self._ready:
            if len(self._queue) >= QUEUE_ITEMS:  # this output is behind: the newest picture wins
                self._queue.popleft()
                self.dropped += 1
            self._queue.append(item)
            self._ready.notify()

    def _write_loop(self) -> None:
        while True:
            with self._ready:
                while not self._queue:
                    self._ready.wait()
                item = self._queue.popleft()
            if item is _CLOSE:
                self._close_container(flush=True)
                if self.dropped:
                    log.warning("%s: %d frames or packets were dropped because the output fell behind", self.name,
                                self.dropped)
                return
            if self.error is not None:
                continue
            if self.container is None and not self._reconnect():
                self.dropped += 1
                continue
            if self.child is not None and not self._child_ok():
                self.dropped += 1
                continue
            kind, payload, pts = item
            try:
                if kind == "frame":
                    self._encode(payload, pts)
                else:
                    self._mux_copy(payload)
            except (av.error.FFmpegError, OSError) as exc:
                self._failed(exc)

    def _reconnect(self) -> bool:
        if time.monotonic() < self._next_try:
            return False
        try:
            self._connect()
        except FATAL_OUTPUT_ERRORS as exc:
            self.error = MediaError(f"cannot publish to {self.name}: {exc}")  # the job fails at its next frame
            return False
        except (av.error.FFmpegError, OSError, MediaError) as exc:
            self._failed(exc)
            return False
        if self.child is None:  # a child says so later (_child_ok)
            self._connected()
        return True

    def _connected(self) -> None:
        if self.reconnects or self._backoff > 1.0:
            log.info("%s: connected again", self.name)
        self._backoff = 1.0

    def _child_ok(self) -> bool:
        """Whether the publishing process is still worth writing to (it connects meanwhile)."""
        try:
            if self.child.check():
                self._connected()
            return True
        except ChildFailed as exc:
            if exc.fatal:
                self._close_container(flush=False)
                self.error = MediaError(f"cannot publish to {self.name}: {exc}")  # the job fails at its next frame
                return False
            self._failed(exc)
        except OSError as exc:  # it did not connect in time
            self._failed(exc)
        return False

    def _failed(self, exc: BaseException) -> None:
        self._close_container(flush=False)
        if not self.network:
            self.error = MediaError(f"writing {self.name} failed: {exc}")
            return
        self.reconnects += 1
        log.warning("%s: %s; reconnecting in %.0f s", self.name, str(exc).split(";")[0], self._backoff)
        self._next_try = time.monotonic() + self._backoff
        self._backoff = min(2 * self._backoff, BACKOFF_MAX_S)

    def _connect(self) -> None:
        try:
            if self.published:  # the child connects; this container writes into its pipe
                self.child = Child(self.target, self.muxer, self.options, connect_s=CONNECT_TIMEOUT_S)
                container = av.open(self.child.writer, "w", format=PIPE_FORMAT, container_options=PIPE_MUX_OPTIONS)
            else:
                container = av.open(self.target, "w", format=self.muxer, options=self.options)
        except FATAL_OUTPUT_ERRORS:
            self._stop_child()
            raise
        except (av.error.FFmpegError, ValueError) as exc:
            self._stop_child()
            raise MediaError(f"cannot open live output {self.name}: {exc}") from None
        try:
            self._add_streams(container)
            container.start_encoding()  # writes a file's header (or the pipe's), connects to a UDP peer
        except BaseException:
            self._stop_child()
            try:
                container.close()
            except Exception:  # it never worked; the first error is the one to report
                pass
            raise
        self.container = container
        self._last_pts = None
        self._last_copied_dts: dict[int, int] = {}  # per copied stream: muxers refuse dts that go back

    def _add_streams(self, container) -> None:
        fps = float(self.info.rate) if self.info.rate else 25.0
        options = dict(X264_LIVE, g=str(max(1, math.ceil(fps * self.gop_s)))) if self.codec == "libx264" else {}
        self.video = add_video_stream(container, self.info, codec=self.codec, crf=self.crf, preset=self.preset,
                                      pix_fmt=self.pix_fmt, where=self.name, extra_options=options)
        self.stream_map = {}
        for s in self.copied:
            try:
                self.stream_map[s.index] = container.add_stream_from_template(s)
            except (ValueError, av.error.FFmpegError) as exc:
                log.warning("%s: not carrying %s stream #%d (%s)", self.name, s.type, s.index, exc)

    def _encode(self, frame: av.VideoFrame, pts: int) -> None:
        if self._last_pts is not None and pts <= self._last_pts:
            return
        self._last_pts = pts
        # The same frame may be queued for other outputs too: they all write the same values.
        frame.pts, frame.time_base = pts, self.info.time_base
        frame.pict_type = av.video.frame.PictureType.NONE
        for packet in self.video.encode(frame):
            self.container.mux(packet)

    def _mux_copy(self, packet: av.Packet) -> None:
        out = self.stream_map.get(packet.stream.index)
        if out is None:
            return
        dts = packet.dts if packet.dts is not None else packet.pts
        if dts is not None:
            dts_out = round(dts * packet.time_base / out.time_base) if out.time_base else dts
            if dts_out <= self._last_copied_dts.get(out.index, -1 << 62):  # dropped, rather than failing the output
                return
            self._last_copied_dts[out.index] = dts_out
        # a packet of its own: the muxer rescales timestamps in place, and other outputs get the same packet
        mine = av.Packet(bytes(packet))
        mine.pts, mine.dts, mine.time_base = packet.pts, packet.dts, packet.time_base
        mine.is_keyframe = packet.is_keyframe
        mine.stream = out
        self.container.mux(mine)

    def _close_container(self, *, flush: bool) -> None:
        container, self.container = self.container, None
        if container is None:
            return
        if self.child is not None:
            if flush and self.child.connected:  # the server gets its end of stream, briefly
                self.child.writer.deadline = time.monotonic() + PUBLISH_CLOSE_S
            else:  # nothing to finish: no waiting on a server that never answered
                self._stop_child()
                flush = False
        try:
            if flush:
                for packet in self.video.encode(None):
                    container.mux(packet)
        except (av.error.FFmpegError, OSError) as exc:
            log.warning("%s: finishing the stream failed: %s", self.name, exc)
        try:
            container.close()
        except (av.error.FFmpegError, OSError) as exc:
            if not self.published or self.child is not None:  # a stopped child's pipe: nothing new to say
                log.warning("%s: closing failed: %s", self.name, exc)
        child, self.child = self.child, None
        if child is not None:
            child.finish(deadline=child.writer.deadline)

    def _stop_child(self) -> None:
        child, self.child = self.child, None
        if child is not None:
            child.kill()


class TeeSink:
    """Several live outputs fed the same frames; each keeps its own pace (see ``StreamSink``)."""

    def __init__(self, sinks: list[StreamSink]):
        self.sinks = sinks

    @property
    def dropped(self) -> int:
        return sum(s.dropped for s in self.sinks)

    def open(self, info: VideoInfo, copied: list) -> str:
        formats = set()
        try:
            for sink in self.sinks:
                formats.add(sink.open(info, copied))
        except BaseException:
            self.abort()
            raise
        if len(formats) > 1:
            self.abort()
            raise MediaError(f"the outputs need different pixel formats ({', '.join(sorted(formats))}); "
                             "give them the same --codec")
        return formats.pop()

    def write(self, frame: av.VideoFrame, pts: int) -> None:
        for sink in self.sinks:
            sink.write(frame, pts)

    def copy(self, packet: av.Packet) -> None:
        for sink in self.sinks:
            sink.copy(packet)

    def commit(self) -> None:
        self._close_all()
        errors = [sink.error for sink in self.sinks if sink.error is not None]  # as StreamSink.commit raises
        if errors:
            raise errors[0]

    def abort(self) -> None:
        self._close_all()

    def _close_all(self) -> None:
        """All outputs flush at once, and are waited for together (not CLOSE_WAIT_S each)."""
        for sink in self.sinks:
            sink.request_close()
        deadline = time.monotonic() + CLOSE_WAIT_S
        for sink in self.sinks:
            sink.await_close(deadline)
