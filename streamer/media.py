"""Reading and writing media with PyAV.

Input: the first video stream is decoded (threaded); every other stream's packets are
handed over untouched, to be copied into the output. File jobs may only use FFmpeg's ``file``
protocol, and playlist-like demuxers (HLS, concat, DASH, image sequences), which could pull in
other files, are refused.

Output: written to a temporary file beside the destination and renamed over it only when
complete. The video keeps the input's size, sample aspect, frame rate, time base and every
frame's pts, its rotation metadata and colour description; the other streams are copied
packet for packet. A data stream the output container cannot hold (e.g. a QuickTime timecode
track in .mp4) is dropped with a warning; an audio or subtitle stream it cannot hold is an
error that names a container that can (.mkv).
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from gpen.weights import publish
from streamer.faces import display_rotation_steps
from streamer.yuv import PLANAR_YUV
from workers import metrics

log = logging.getLogger(__name__)

REFUSED_DEMUXERS = {"hls", "applehttp", "concat", "dash", "image2", "image2pipe", "ffconcat"}
# What FFmpeg's demuxers log when a file stops before its own structure says it should.
TRUNCATION_MARKERS = ("ended prematurely", "partial file", "truncat", "end of file reached before")
DEFAULT_CODEC = "libx264"
TUNED_CODECS = ("libx264", "libx265")  # the encoders --crf and --preset are passed to


class MediaError(RuntimeError):
    """The input cannot be read or the output cannot be written; the message says why."""


AVCOL_SPC_RGB, AVCOL_SPC_BT709 = 0, 1


@dataclass(frozen=True)
class VideoInfo:
    path: Path
    stream_index: int
    width: int
    height: int
    pix_fmt: str
    bits: int
    codec: str
    time_base: Fraction
    rate: Fraction | None
    frames: int  # from the container index; 0 if unknown
    duration_s: float | None  # the video stream's, else the container's (for progress)
    stream_duration_s: float | None  # the video stream's own, if the container records it
    start_s: float  # the video stream's start time
    rotation: int  # degrees counter-clockwise, from the display matrix
    colorspace: int
    color_range: int
    color_primaries: int
    color_trc: int
    sample_aspect: Fraction | None

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


def _ffmpeg_url(path: Path) -> str:
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
        container = av.open(_ffmpeg_url(path), options={"protocol_whitelist": "file"})
    except (av.error.FFmpegError, UnicodeDecodeError) as exc:
        detail = "empty file" if path.stat().st_size == 0 else str(exc).split(";")[0]
        raise MediaError(f"{path} is not a readable video file (truncated, corrupt or another format): "
                         f"{detail}") from None
    if container.format.name in REFUSED_DEMUXERS or container.format.name.split(",")[0] in REFUSED_DEMUXERS:
        container.close()
        raise MediaError(f"{path} is a {container.format.name} playlist/sequence, which may reference other "
                         "files; give gpen-stream the media file itself")
    if video_stream(container) is None:
        kinds = sorted({s.type for s in container.streams}) or ["none"]
        container.close()
        raise MediaError(f"{path} has no video stream (streams: {', '.join(kinds)}; cover art does not count)")
    return container


def probe(path: str | Path) -> VideoInfo:
    """Open ``path`` (with the file-job restrictions) and describe its first video stream."""
    with open_input(path) as container:
        stream = video_stream(container)
        cc = stream.codec_context
        if not stream.width or not stream.height or cc.format is None:
            raise MediaError(f"{path}: video stream has no usable size or pixel format")
        stream_duration = None
        if stream.duration is not None and stream.time_base:
            stream_duration = float(stream.duration * stream.time_base)
        duration = stream_duration
        if duration is None and container.duration is not None:
            duration = container.duration / av.time_base
        try:  # the display matrix reaches us on decoded frames
            rotation = int(round(next(container.decode(stream)).rotation or 0))
        except (StopIteration, av.error.FFmpegError):
            rotation = 0
        return VideoInfo(
            path=Path(path), stream_index=stream.index, width=stream.width, height=stream.height,
            pix_fmt=cc.format.name, bits=max((c.bits for c in cc.format.components), default=8), codec=cc.name,
            time_base=stream.time_base, rate=stream.average_rate or stream.guessed_rate, frames=stream.frames or 0,
            duration_s=duration, stream_duration_s=stream_duration,
            start_s=float(stream.start_time * stream.time_base) if stream.start_time is not None else 0.0,
            rotation=rotation, colorspace=int(cc.colorspace), color_range=int(cc.color_range),
            color_primaries=int(cc.color_primaries), color_trc=int(cc.color_trc),
            sample_aspect=stream.sample_aspect_ratio)


def output_pix_fmt(info: VideoInfo, codec: str) -> str:
    """The input's format when the encoder takes it and we can composite into it; else the
    nearest planar YUV (4:4:4 for odd sizes, which 4:2:0 cannot represent)."""
    try:
        supported = {f.name for f in av.codec.Codec(codec, "w").video_formats or ()}
    except (av.error.FFmpegError, ValueError) as exc:
        raise MediaError(f"unknown or unavailable encoder '{codec}': {exc}") from None
    odd = info.width % 2 or info.height % 2
    fmt = info.pix_fmt
    if fmt in supported and fmt in PLANAR_YUV and not (odd and PLANAR_YUV[fmt][:2] != (0, 0)):
        return fmt
    deep = info.bits > 8
    for candidate in ((["yuv444p10le"] if deep else []) + ["yuv444p"] if odd else
                      (["yuv420p10le"] if deep else []) + ["yuv420p", "yuv444p"]):
        if candidate in supported:
            if deep and not candidate.endswith("10le"):
                log.warning("%s cannot write %d-bit video; the output will be 8-bit", codec, info.bits)
            return candidate
    raise MediaError(f"encoder {codec} takes none of the pixel formats gpen-stream can write for {fmt} "
                     f"{info.width}x{info.height}")


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


class Writer:
    """Encodes frames and copies the other streams into a temporary file beside ``path``;
    ``commit()`` renames it into place, ``abort()`` deletes it."""

    def __init__(self, path: str | Path, info: VideoInfo, copied: list, *, codec: str | None, crf: float,
                 preset: str):
        self.path = Path(path)
        self.info = info
        self.codec = codec or DEFAULT_CODEC
        self.crf, self.preset = crf, preset
        check_output(self.path)
        if self.codec not in TUNED_CODECS:
            log.warning("--crf and --preset apply to %s only; %s runs with its defaults",
                        " and ".join(TUNED_CODECS), self.codec)
        self.pix_fmt = output_pix_fmt(info, self.codec)
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.stem}.", suffix=f".part{self.path.suffix}",
                                   dir=self.path.parent)
        os.close(fd)
        self.tmp = Path(tmp)  # keeps the real extension last, so FFmpeg picks the same muxer
        self._last_pts: int | None = None
        self.fixed_pts = 0
        self.container = None
        try:
            self._open(copied)
        except Exception:
            self.abort()
            raise

    def _open(self, copied: list, *, retrying: bool = False) -> None:
        try:
            self.container = av.open(_ffmpeg_url(self.tmp), "w")
        except (av.error.FFmpegError, ValueError) as exc:
            raise MediaError(f"cannot write {self.path.suffix} files: {exc}") from None
        self.video = self._add_video()
        self.stream_map = {}
        for s in copied:
            try:
                self.stream_map[s.index] = self.container.add_stream_from_template(s)
            except (ValueError, av.error.FFmpegError) as exc:
                if s.type != "data":
                    raise MediaError(f"{self.path.suffix} cannot hold {s.type} stream #{s.index} "
                                     f"({s.codec_context.name}): {exc}; write .mkv instead") from None
                log.warning("dropping data stream #%d: %s cannot hold it", s.index, self.path.suffix)
        try:
            self.container.start_encoding()
        except av.error.FFmpegError as exc:
            data = [s for s in copied if s.type == "data" and s.index in self.stream_map]
            if retrying or not data:
                raise MediaError(f"cannot start writing {self.path}: {exc}") from None
            # Some muxers accept a data stream but cannot write its header: drop those and retry.
            log.warning("dropping data stream(s) %s: %s cannot hold them",
                        ", ".join(f"#{s.index}" for s in data), self.path.suffix)
            self.container.close()
            self._open([s for s in copied if s.type != "data"], retrying=True)

    def _add_video(self):
        info = self.info
        options = {"crf": f"{self.crf:g}", "preset": self.preset} if self.codec in TUNED_CODECS else {}
        try:
            stream = self.container.add_stream(self.codec, rate=info.rate or Fraction(25), options=options)
        except (av.error.FFmpegError, ValueError) as exc:
            raise MediaError(f"cannot use encoder {self.codec} for {self.path.suffix}: {exc}") from None
        stream.width, stream.height, stream.pix_fmt = info.width, info.height, self.pix_fmt
        stream.time_base = info.time_base
        cc = stream.codec_context
        cc.time_base = info.time_base
        cc.colorspace, cc.color_range = info.output_colorspace, info.color_range
        cc.color_primaries, cc.color_trc = info.color_primaries, info.color_trc
        if info.sample_aspect:
            cc.sample_aspect_ratio = info.sample_aspect
        if info.rotation:
            stream.set_display_rotation(info.rotation)
        return stream

    def write(self, frame: av.VideoFrame, pts: int | None, index: int) -> None:
        if pts is None:
            pts = int(round(index * self.info.frame_step_s / float(self.info.time_base)))
        if self._last_pts is not None and pts <= self._last_pts:
            pts = self._last_pts + 1  # encoders refuse repeated timestamps
            self.fixed_pts += 1
        self._last_pts = pts
        frame.pts = pts
        frame.time_base = self.info.time_base
        frame.pict_type = av.video.frame.PictureType.NONE  # let the encoder choose frame types
        try:
            for packet in self.video.encode(frame):
                self.container.mux(packet)
        except av.error.FFmpegError as exc:
            raise MediaError(f"encoding {self.path} failed: {exc}") from None

    def copy(self, packet: av.Packet) -> None:
        out = self.stream_map.get(packet.stream.index)
        if out is not None:
            packet.stream = out
            try:
                self.container.mux(packet)
            except av.error.FFmpegError as exc:
                raise MediaError(f"copying stream #{packet.stream.index} into {self.path} failed: {exc}") from None

    def commit(self) -> Path:
        try:
            for packet in self.video.encode(None):
                self.container.mux(packet)
            self.container.close()
        except av.error.FFmpegError as exc:
            raise MediaError(f"finishing {self.path} failed: {exc}") from None
        with open(self.tmp, "rb+") as f:
            os.fsync(f.fileno())
        publish(self.tmp, self.path)
        return self.path

    def abort(self) -> None:
        if self.container is not None:
            try:
                self.container.close()
            except Exception:  # the file is being thrown away; a close error changes nothing
                pass
        self.tmp.unlink(missing_ok=True)


def check_output(path: Path, input_path: Path | None = None) -> None:
    """Fail fast, before any slow work, on an output that cannot be written."""
    if not path.suffix:
        raise MediaError(f"output {path} has no extension; use .mp4, .mkv or .mov")
    if path.is_dir():
        raise MediaError(f"output {path} is a folder; give a file name")
    if input_path is not None and path.resolve() == Path(input_path).resolve():
        raise MediaError("output must not be the input file")
    folder = path.parent
    if not folder.is_dir():
        raise MediaError(f"output folder does not exist: {folder}")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise MediaError(f"output folder is not writable: {folder}")


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
