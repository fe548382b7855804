"""Opening an input with the rules for file jobs, and describing its video stream.

File jobs may only use FFmpeg's ``file`` protocol, and playlist-like demuxers (HLS, concat,
DASH, image sequences), which could pull in other files, are refused.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from configs.errors import InputError
from streamer.faces.face import display_rotation_steps
from streamer.io.yuv import PLANAR_YUV

log = logging.getLogger(__name__)

# Demuxers a file job may not use: playlists and sequences open other files (even FIFOs, or
# anything a playlist names), and single images are not videos. They are kept out with
# FFmpeg's own format_whitelist, so they are refused before they read anything.
REFUSED_DEMUXERS = {"hls", "applehttp", "concat", "dash", "image2", "image2pipe", "ffconcat"}
# What the refused files start with, to say what they are.
SIGNATURES = ((b"#EXTM3U", "an HLS playlist"), (b"ffconcat", "an FFmpeg concat list"),
              (b"\x89PNG", "a PNG image"), (b"\xff\xd8\xff", "a JPEG image"), (b"GIF8", "a GIF image"),
              (b"BM", "a BMP image"), (b"RIFF", "a RIFF file (WebP image or WAV audio)"))


def _allowed_demuxers() -> str:
    names = [n for n in av.formats_available if av.format.ContainerFormat(n).is_input and n not in REFUSED_DEMUXERS
             and not n.endswith("_pipe")]
    return ",".join(sorted(names))


_ALLOWED_DEMUXERS = _allowed_demuxers()


class MediaError(InputError):
    """The input cannot be read or the output cannot be written; the message says why."""


AVCOL_SPC_RGB, AVCOL_SPC_BT709 = 0, 1


@dataclass(frozen=True)
class VideoInfo:
    """What a source says about its video stream; everything a sink needs to write the same."""

    name: str  # the file's path or the stream's URL (without credentials), for messages
    container: str  # FFmpeg's demuxer name, e.g. "mov,mp4,m4a,3gp,3g2,mj2", "matroska,webm"
    stream_index: int
    width: int
    height: int
    pix_fmt: str
    bits: int
    codec: str
    time_base: Fraction
    rate: Fraction | None
    frames: int  # from the container index (edit lists not applied); 0 if unknown
    duration_s: float | None  # the video stream's length, else the container's (for progress)
    # Where the file says its streams end, in seconds on the file's clock (absolute, like
    # start_s: a video may start late, after the audio or after a cut kept its timestamps).
    stream_end_s: float | None  # the video stream's own end, if the container records it
    container_end_s: float | None  # the whole file's (audio may outlast the video)
    start_s: float  # the video stream's start time
    rotation: int  # degrees counter-clockwise, from the display matrix
    colorspace: int
    color_range: int
    color_primaries: int
    color_trc: int
    sample_aspect: Fraction | None
    field_order: int = 0  # AVFieldOrder: 0 unknown, 1 progressive, 2.. interlaced (tt, bb, tb, bt)

    @property
    def rotation_steps(self) -> int:
        return display_rotation_steps(self.rotation)

    @property
    def frame_step_s(self) -> float:
        """Nominal seconds per frame (for frames without timestamps)."""
        return 1.0 / float(self.rate) if self.rate else 1 / 25

    @property
    def output_colorspace(self) -> int:
        """The YUV matrix to write: the input's, or BT.709 when the input is RGB."""
        return AVCOL_SPC_BT709 if self.colorspace == AVCOL_SPC_RGB else self.colorspace

    @property
    def expected_frames(self) -> int:
        """Index count, else duration x rate, else 0."""
        if self.frames:
            return self.frames
        if self.duration_s and self.rate:
            return int(round(self.duration_s * float(self.rate)))
        return 0


def ffmpeg_url(path: Path) -> str:
    # "file:" keeps FFmpeg from reading "clip:1.mp4" as a protocol named "clip"
    return "file:" + str(path.absolute())


def video_stream(container) -> av.VideoStream | None:
    """The main video stream: the first one that is not an attached picture (cover art)."""
    attached = av.stream.Disposition.attached_pic
    return next((s for s in container.streams.video if not s.disposition & attached), None)


def open_input(path: str | Path) -> av.container.InputContainer:
    path = Path(path)
    if not path.exists():
        raise MediaError(f"input not found: {path}")
    if not path.is_file():
        raise MediaError(f"input is not a file: {path}")
    if not os.access(path, os.R_OK):
        raise MediaError(f"input is not readable: {path}")
    try:
        container = av.open(ffmpeg_url(path), options={"protocol_whitelist": "file",
                                                        "format_whitelist": _ALLOWED_DEMUXERS})
    except (av.error.FFmpegError, UnicodeDecodeError) as exc:
        if path.stat().st_size == 0:
            raise MediaError(f"{path} is not a readable video file: empty file") from None
        what = _what_it_is(path)
        if what is not None:
            raise MediaError(f"{path} is {what}, not a video file; give gpen-stream the video itself "
                             "(playlists, lists and images are refused)") from None
        raise MediaError(f"{path} is not a readable video file (truncated, corrupt or another format): "
                         f"{str(exc).split(';')[0]}") from None
    if video_stream(container) is None:
        kinds = sorted({s.type for s in container.streams}) or ["none"]
        container.close()
        raise MediaError(f"{path} has no video stream (streams: {', '.join(kinds)}; cover art does not count)")
    return container


def _what_it_is(path: Path) -> str | None:
    try:
        with open(path, "rb") as f:
            head = f.read(512)
    except OSError:
        return None
    if b"<MPD" in head:
        return "a DASH manifest"
    return next((what for magic, what in SIGNATURES if head.startswith(magic)), None)


def probe(path: str | Path) -> VideoInfo:
    """Open ``path`` (with the file-job restrictions) and describe its first video stream."""
    with open_input(path) as container:
        return describe(container, str(path))


def describe(container, name: str) -> VideoInfo:
    """Describe the main video stream of an open container (reads its first frame for the
    display rotation, which reaches us on decoded frames)."""
    stream = video_stream(container)
    cc = stream.codec_context
    if not stream.width or not stream.height or cc.format is None:
        raise MediaError(f"{name}: the video stream has no usable size or pixel format: the file is truncated or "
                         "corrupt")
    start_s = float(stream.start_time * stream.time_base) if stream.start_time is not None else 0.0
    container_end = _container_end_s(container)
    stream_end = _stream_end_s(container, stream, start_s)
    try:
        rotation = int(round(next(container.decode(stream)).rotation or 0))
    except (StopIteration, av.error.FFmpegError):
        rotation = 0
    return VideoInfo(
        name=name, container=container.format.name, stream_index=stream.index, width=stream.width, height=stream.height,
        pix_fmt=cc.format.name, bits=max((c.bits for c in cc.format.components), default=8), codec=cc.name,
        time_base=stream.time_base, rate=stream.average_rate or stream.guessed_rate, frames=stream.frames or 0,
        duration_s=stream_end - start_s if stream_end else _container_length_s(container),
        stream_end_s=stream_end, container_end_s=container_end, start_s=start_s,
        rotation=rotation, colorspace=int(cc.colorspace), color_range=int(cc.color_range),
        color_primaries=int(cc.color_primaries), color_trc=int(cc.color_trc),
        sample_aspect=stream.sample_aspect_ratio, field_order=int(cc.field_order or 0))


def _stream_end_s(container, stream, start_s: float) -> float | None:
    """Where the video stream ends on the file's clock, if the file records it per stream.

    Matroska keeps it as the stream's DURATION tag, which FFmpeg's muxer writes as the end
    time (a video that starts at 1.5 s and lasts 3 s is tagged 4.5 s); ``stream.duration`` is
    not the stream's own there: for H.264, libavformat copies the container's duration (the
    longest stream's) into it. Elsewhere ``stream.duration`` is a length from the stream's
    start, unless it is that same copy of the container's, which says nothing of the video."""
    if container.format.name.startswith("matroska"):
        return _tag_seconds(stream.metadata.get("DURATION", ""))
    if stream.duration is None or not stream.time_base:
        return None
    length = float(stream.duration * stream.time_base)
    if container.duration is not None and abs(length - container.duration / av.time_base) <= float(stream.time_base):
        return None
    return start_s + length


def _container_end_s(container) -> float | None:
    """The earliest the file's streams may end. libavformat's container duration is a length
    from the container's start for most demuxers, but Matroska's and NUT's are the end time
    itself: a file falls short only if it falls short of both readings."""
    if container.duration is None:
        return None
    duration = container.duration / av.time_base
    start = container.start_time / av.time_base if container.start_time is not None else 0.0
    return duration + min(0.0, start)


def _container_length_s(container) -> float | None:
    return container.duration / av.time_base if container.duration is not None else None


def _tag_seconds(value: str) -> float | None:
    """'HH:MM:SS.fraction' -> seconds (None if it is not that)."""
    try:
        h, m, sec = value.strip().split(":")
        return int(h) * 3600 + int(m) * 60 + float(sec)
    except ValueError:
        return None


def packet_offset_s(packet: av.Packet) -> float | None:
    """Seconds since the start of the packet's stream (streams may start at different epochs)."""
    ts = packet.dts if packet.dts is not None else packet.pts
    if ts is None:
        return None
    start = packet.stream.start_time or 0
    return float((ts - start) * packet.time_base)


def luma(frame: av.VideoFrame) -> np.ndarray:
    """The frame's luma as uint8 (a view when the frame is 8-bit planar YUV)."""
    fmt = frame.format.name
    if fmt in PLANAR_YUV or fmt in ("nv12", "nv21", "gray"):
        plane = frame.planes[0]
        if PLANAR_YUV.get(fmt, (0, 0, 8))[2] > 8:
            rows = np.frombuffer(plane, dtype="<u2").reshape(plane.height, -1)[:, :plane.width]
            return (rows >> 2).astype(np.uint8)
        return np.frombuffer(plane, dtype=np.uint8).reshape(plane.height, plane.line_size)[:, :plane.width]
    return frame.to_ndarray(format="gray")
