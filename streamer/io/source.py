"""The file source: demux + decode one video file.

The first video stream (not cover art) is decoded, threaded; every other stream's packets
are handed over untouched, to be copied into the output. Undecodable packets are skipped and
counted (or fail the job); a file that ends before its own structure says it should is
refused as truncated.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import av

from streamer.io.probe import MediaError, VideoInfo, open_input
from workers import metrics

log = logging.getLogger(__name__)

# What FFmpeg's demuxers log when a file stops before its own structure says it should.
TRUNCATION_MARKERS = ("ended prematurely", "partial file", "truncat", "end of file reached before")


@dataclass
class DecodedFrame:
    index: int  # decode order
    frame: av.VideoFrame
    pts: int | None
    time_s: float


class Reader:
    """Demux + decode. ``frames()`` yields DecodedFrame; other streams' packets go to
    ``on_packet``. Undecodable packets are skipped and counted (or raise, with strict)."""

    def __init__(self, info: VideoInfo, *, strict: bool = False):
        if av.logging.get_level() is None or av.logging.get_level() < av.logging.ERROR:
            av.logging.set_level(av.logging.ERROR)  # truncation is only visible in FFmpeg's log
        self.container = open_input(info.path)
        self.info, self.strict = info, strict
        self.video = self.container.streams[info.stream_index]
        self.video.thread_type = "AUTO"
        self.copied = [s for s in self.container.streams if s is not self.video and s.type in ("audio", "subtitle", "data")]
        dropped = [f"#{s.index} ({s.type})" for s in self.container.streams
                   if s is not self.video and s not in self.copied]
        if dropped:
            log.warning("not copied: stream(s) %s (only one video stream is restored)", ", ".join(dropped))
        self.corrupt = 0
        self.decoded = 0
        self.last_time_s = 0.0

    def frames(self, on_packet):
        """Decoded frames; ``on_packet`` gets the other streams' packets, then None once the
        input is exhausted."""
        fallback_step = self.info.frame_step_s
        with av.logging.Capture(local=True) as demuxer_log:
            for packet in self.container.demux(self.video, *self.copied):
                if packet.stream is not self.video:
                    if packet.dts is not None or packet.pts is not None:
                        on_packet(packet)
                    continue
                try:
                    decoded = packet.decode()
                except av.error.InvalidDataError as exc:
                    self._corrupt(exc)
                    continue
                for frame in decoded:
                    yield self._wrap(frame, fallback_step)
            # demux() ends with an empty packet per stream, which flushed the decoder above
        for _level, source, message in demuxer_log:
            if any(marker in message.lower() for marker in TRUNCATION_MARKERS):
                raise MediaError(f"{self.info.path} ends early after {self.decoded} frames ({source}: "
                                 f"{message.strip()}); the file is truncated or corrupt")
        self._check_complete(fallback_step)
        on_packet(None)

    def close(self) -> None:
        self.container.close()

    def _wrap(self, frame: av.VideoFrame, step: float) -> DecodedFrame:
        t = float(frame.time) if frame.time is not None else self.decoded * step
        self.last_time_s = t
        item = DecodedFrame(self.decoded, frame, frame.pts, t)
        self.decoded += 1
        return item

    def _corrupt(self, exc: Exception) -> None:
        self.corrupt += 1
        metrics.CORRUPT_FRAMES.inc()
        if self.strict:
            raise MediaError(f"{self.info.path}: undecodable video data after frame {self.decoded} ({exc}); "
                             "use --corrupt-frames skip to skip such frames") from None
        log.warning("skipping undecodable video data after frame %d: %s", self.decoded, str(exc).split(";")[0])

    def _check_complete(self, step: float) -> None:
        if self.decoded == 0:
            raise MediaError(f"{self.info.path}: no video frame could be decoded")
        expected = self.info.frames
        if expected and self.decoded + self.corrupt < expected * 0.99 - 2:
            raise MediaError(f"{self.info.path} ends early: {self.decoded} of {expected} frames could be read; "
                             "the file is truncated or corrupt")
        duration = self.info.stream_duration_s  # not the container's: audio may outlast the video
        if not expected and duration and self.last_time_s + step < duration - max(1.0, 3 * step):
            raise MediaError(f"{self.info.path} ends early: frames stop at {self.last_time_s:.2f} s of "
                             f"{duration:.2f} s; the file is truncated or corrupt")
