"""Sources: where a job's frames come from. A source describes its video (``info``), names
the other streams whose packets pass through to the sink (``copied``), and yields decoded
frames with strictly increasing timestamps.

``FileSource`` reads one local file, with the rules for file jobs: only FFmpeg's ``file``
protocol, no playlists (see ``streamer.io.probe``), and honest accounting of damage:

- a packet the decoder refuses is skipped and counted (``corrupt``), or fails the job;
- a frame the decoder had to conceal (FFmpeg's "error while decoding MB": it comes out with
  guessed blocks) is kept, as every player shows it, and counted (``concealed``), or fails
  the job;
- a container that lost sync (its demuxer logged an error) is counted (``damaged``), or
  fails the job;
- a file that ends before its own structure says it should is truncated and always fails:
  the container's frame count (minus the frames its edit list hides), else where the video
  stream says it ends, else where the whole file says it ends is the yardstick (compared as
  end times on the file's clock, so a video that starts late is not taken for a short one);
- timestamps are repaired where the file's own are missing or go backwards
  (``streamer.io.timestamps``), and counted (``fixed_pts``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Protocol

import av

from streamer.io.probe import MediaError, VideoInfo, describe, open_input
from streamer.io.timestamps import TimestampRepair
from workers import metrics

log = logging.getLogger(__name__)

# What FFmpeg's demuxers log when a file stops before its own structure says it should.
TRUNCATION_MARKERS = ("ended prematurely", "partial file", "truncat", "end of file reached before")
ERROR_LEVEL = 16  # AV_LOG_ERROR
COPIED_TYPES = ("audio", "subtitle", "data")


@dataclass
class DecodedFrame:
    index: int  # output order (0, 1, 2, ...)
    frame: av.VideoFrame
    pts: int  # strictly increasing, in the stream's time base
    time_s: float  # pts in seconds
    arrived: float = 0.0  # time.monotonic() when a live source received it (0 for files)
    new_session: bool = False  # the first frame after a live source reconnected (tracks restart)


class Source(Protocol):
    info: VideoInfo
    copied: list  # av streams whose packets are copied to the sink

    def frames(self, on_packet: Callable[[av.Packet | None], None]) -> Iterator[DecodedFrame]:
        """Decoded video frames; ``on_packet`` gets the copied streams' packets, then None at
        the end of the input."""

    def summary(self) -> dict[str, int]:
        """Counts of what went wrong and was handled (corrupt, concealed, ...)."""

    def close(self) -> None: ...


def copied_streams(container, video) -> list:
    """Streams to copy: audio, subtitles, data and cover art; other video streams are not."""
    attached = av.stream.Disposition.attached_pic
    copied = [s for s in container.streams if s is not video and
              (s.type in COPIED_TYPES or (s.type == "video" and s.disposition & attached))]
    dropped = [f"#{s.index} ({s.type})" for s in container.streams if s is not video and s not in copied]
    if dropped:
        log.warning("not copied: stream(s) %s (only one video stream is restored)", ", ".join(dropped))
    return copied


class FileSource:
    def __init__(self, path: str | Path, *, strict: bool = False, info: VideoInfo | None = None):
        self.path = Path(path)
        self.strict = strict  # fail on the first damaged frame instead of counting it
        if av.logging.get_level() is None or av.logging.get_level() < av.logging.ERROR:
            av.logging.set_level(av.logging.ERROR)  # truncation is only visible in FFmpeg's log
        # PyAV holds a repeated message back and emits it later, into whatever capture is open
        # then (another job's): every message must reach the capture of the code that caused it.
        av.logging.set_skip_repeated(False)
        if info is None:
            with open_input(self.path) as container:  # describe() decodes a frame: read from the top after
                info = describe(container, str(self.path))
        self.container = self._open_logged()
        self.info = info
        self.video = self.container.streams[self.info.stream_index]
        self.video.thread_type = "AUTO"  # frame threads also flag concealed frames (slice threads do not)
        self.copied = copied_streams(self.container, self.video)
        self.corrupt = self.concealed = self.damaged = self.decoded = 0
        self.discarded = 0  # packets the edit list hides: they decode to no frame
        self.last_time_s = 0.0
        self.last_other_s = 0.0  # the latest timestamp of the copied streams
        step = max(1, round(self.info.frame_step_s / float(self.info.time_base)))
        start = round(self.info.start_s / float(self.info.time_base))
        self.timestamps = TimestampRepair(step=step, start=start)

    def _open_logged(self):
        """Open the file, keeping what its demuxer says while reading the header: a Matroska
        file damaged in the middle already complains there (reading its index)."""
        with av.logging.Capture(local=True) as opening:
            container = open_input(self.path)
        self._opening_log = list(opening)
        return container

    def summary(self) -> dict[str, int]:
        return {"corrupt_frames": self.corrupt, "concealed_frames": self.concealed,
                "damaged_spots": self.damaged, "fixed_pts": self.timestamps.fixed}

    def frames(self, on_packet: Callable[[av.Packet | None], None]) -> Iterator[DecodedFrame]:
        with av.logging.Capture(local=True) as demuxer_log:  # the demuxer runs in this thread
            demuxer_log.extend(self._opening_log)
            seen = 0
            cut_short: set[int] = set()  # copied streams whose latest packet was cut short
            for packet in self.container.demux(self.video, *self.copied):
                seen = self._note_demuxer_errors(demuxer_log, seen)
                if packet.stream is not self.video:
                    if packet.size == 0:  # the demuxer's end-of-stream marker
                        continue
                    if packet.is_corrupt:  # not copied: a muxer would write a damaged packet as good
                        self._damage("damaged", f"a packet of stream #{packet.stream.index} ({packet.stream.type}) "
                                                "is cut short or damaged")
                        cut_short.add(packet.stream.index)
                        continue
                    cut_short.discard(packet.stream.index)
                    self._note_other(packet)
                    on_packet(packet)
                    continue
                if packet.is_discard and packet.size:
                    self.discarded += 1
                try:
                    decoded = packet.decode()
                except av.error.InvalidDataError as exc:
                    self._damage("corrupt", f"undecodable video data after frame {self.decoded} ({exc})")
                    continue
                for frame in decoded:
                    yield from self._settle(frame)
            # demux() ends with an empty packet per stream, which flushed the decoder above
            self._note_demuxer_errors(demuxer_log, seen)
        for item in self.timestamps.flush():
            yield self._wrap(item)
        if cut_short:  # the last packets of a stream are cut short: the file stops early
            raise MediaError(f"{self.info.name} ends early: the last packet of stream(s) "
                             f"{', '.join(f'#{i}' for i in sorted(cut_short))} is cut short; the file is truncated")
        self._check_complete(list(demuxer_log))
        on_packet(None)

    def close(self) -> None:
        self.container.close()

    # ------------------------------------------------------------------ per frame

    def _settle(self, frame: av.VideoFrame) -> Iterator[DecodedFrame]:
        if frame.is_corrupt:
            self._damage("concealed", f"frame {self.decoded} was damaged and concealed by the decoder")
        for item in self.timestamps.push(frame, frame.pts, frame.dts):
            yield self._wrap(item)

    def _wrap(self, frame: av.VideoFrame) -> DecodedFrame:
        t = float(frame.pts * self.info.time_base)
        self.last_time_s = t
        item = DecodedFrame(self.decoded, frame, frame.pts, t)
        self.decoded += 1
        return item

    def _note_other(self, packet: av.Packet) -> None:
        ts = packet.pts if packet.pts is not None else packet.dts
        if ts is not None and packet.time_base:
            self.last_other_s = max(self.last_other_s, float(ts * packet.time_base))

    def _note_demuxer_errors(self, demuxer_log: list, seen: int) -> int:
        demuxer = self.container.format.name  # not the codec parsers, which log from this thread too
        for level, source, message in demuxer_log[seen:]:
            if level <= ERROR_LEVEL and source == demuxer and not any(m in message.lower() for m in TRUNCATION_MARKERS):
                self._damage("damaged", f"the container is damaged near frame {self.decoded} "
                                        f"({source}: {message.strip()})")
        return len(demuxer_log)

    def _damage(self, kind: str, what: str) -> None:
        setattr(self, kind, getattr(self, kind) + 1)
        (metrics.CORRUPT_FRAMES if kind == "corrupt" else metrics.DAMAGED_INPUT).inc()
        if self.strict:
            raise MediaError(f"{self.path}: {what}; use --corrupt-frames skip to go on past damage")
        log.warning("%s: %s", self.path, what)

    # ------------------------------------------------------------------ at the end

    def _check_complete(self, demuxer_log: list) -> None:
        info = self.info
        why = next((f"{source}: {message.strip()}" for _, source, message in demuxer_log
                    if any(m in message.lower() for m in TRUNCATION_MARKERS)), None)
        if why is not None:  # the demuxer itself says the file stops early
            raise MediaError(f"{info.name} ends early after {self.decoded} frames ({why}); the file is truncated "
                             "or damaged")
        if self.damaged:
            why = next((f"{source}: {message.strip()}" for level, source, message in demuxer_log
                        if level <= ERROR_LEVEL and source == self.container.format.name), None)
        if self.decoded == 0:
            raise MediaError(f"{info.name}: no video frame could be decoded" + (f" ({why})" if why else ""))
        step = info.frame_step_s
        slack = max(1.0, 3 * step)
        end = self.last_time_s + step  # where the video read ends, on the file's clock (as the yardsticks)
        # Only MP4/MOV count frames reliably (AVI's index also counts the empty chunks it uses
        # for variable frame rate); edit lists hide some of them from the decoder.
        expected = info.frames - self.discarded if info.container.startswith("mov,") else 0
        if expected > 0:
            short = self.decoded + self.corrupt < expected * 0.99 - 2
            read = f"{self.decoded} of {expected} frames could be read"
        elif info.stream_end_s:
            short = end < info.stream_end_s - slack
            read = f"frames stop at {end:.2f} s of {info.stream_end_s:.2f} s"
        elif info.container_end_s:  # no per-stream figure: neither the video nor the rest reached the end
            reached = max(end, self.last_other_s)
            short = reached < info.container_end_s - slack
            read = f"the streams stop at {reached:.2f} s of {info.container_end_s:.2f} s"
        else:
            short = False
        if short:
            raise MediaError(f"{info.name} ends early: {read}" + (f" ({why})" if why else "") +
                             "; the file is truncated or damaged")
