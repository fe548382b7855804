"""Sinks: where a job's restored frames go. A sink is opened with the source's description
(``open(info, copied)`` returns the pixel format the frames must be in), receives frames with
strictly increasing timestamps and the copied streams' packets, and is then committed (the
output is complete) or aborted (nothing is left).

``FileSink`` writes one file, atomically: everything goes to a hidden temporary file beside
the destination, renamed over it only on commit. The video keeps the input's size, sample
aspect, frame rate, time base and every frame's pts, its rotation metadata, colour
description and field order (interlaced input stays interlaced); the other streams, cover
art included, are copied packet for packet. A data stream the output container cannot hold
(e.g. a QuickTime timecode track in .mp4) is dropped with a warning; an audio or subtitle
stream it cannot hold is an error that names a container that can (.mkv). Formats that write
several files (HLS, DASH, image sequences) cannot be written atomically and are refused.
"""

from __future__ import annotations

import logging
import os
from fractions import Fraction
from pathlib import Path
from typing import Protocol

import av

from configs.atomic import AtomicFile
from streamer.io.probe import MediaError, VideoInfo, ffmpeg_url
from streamer.io.yuv import PLANAR_YUV

log = logging.getLogger(__name__)

DEFAULT_CODEC = "libx264"
TUNED_CODECS = ("libx264", "libx265")  # the encoders --crf and --preset are passed to
# Muxers that write exactly one file (so the temporary file + rename is the whole output).
SINGLE_FILE_MUXERS = {"mp4", "mov", "matroska", "webm", "avi", "mpegts", "mxf", "flv", "nut", "ipod", "3gp", "3g2"}
INTERLACED_FLAGS = av.codec.context.Flags.interlaced_dct | av.codec.context.Flags.interlaced_me


class Sink(Protocol):
    def open(self, info: VideoInfo, copied: list) -> str:
        """Prepare the output for this video; returns the pixel format frames must be in."""

    def write(self, frame: av.VideoFrame, pts: int) -> None: ...

    def copy(self, packet: av.Packet) -> None: ...

    def commit(self) -> Path | None:
        """The output is complete: make it visible (a file sink renames it into place)."""

    def abort(self) -> None:
        """Something failed: leave nothing behind (safe to call more than once)."""


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


def add_video_stream(container, info: VideoInfo, *, codec: str, crf: float, preset: str, pix_fmt: str,
                     where: str, extra_options: dict[str, str] | None = None):
    """Add the encoded video stream to an output ``container``, described like the input."""
    options = {"crf": f"{crf:g}", "preset": preset} if codec in TUNED_CODECS else {}
    options.update(extra_options or {})
    try:
        stream = container.add_stream(codec, rate=info.rate or Fraction(25), options=options)
    except (av.error.FFmpegError, ValueError) as exc:
        raise MediaError(f"cannot use encoder {codec} for {where}: {exc}") from None
    stream.width, stream.height, stream.pix_fmt = info.width, info.height, pix_fmt
    stream.time_base = info.time_base
    cc = stream.codec_context
    cc.time_base = info.time_base
    cc.colorspace, cc.color_range = info.output_colorspace, info.color_range
    cc.color_primaries, cc.color_trc = info.color_primaries, info.color_trc
    if info.sample_aspect:
        cc.sample_aspect_ratio = info.sample_aspect
    if info.field_order > 1:  # interlaced: encode field-aware and record the field order
        cc.field_order = info.field_order
        cc.flags |= INTERLACED_FLAGS
    if info.rotation:
        stream.set_display_rotation(info.rotation)
    return stream


def encode(stream, container, frame: av.VideoFrame | None, where: str) -> None:
    """Encode one frame (None: flush the encoder) and mux what comes out."""
    try:
        for packet in stream.encode(frame):
            container.mux(packet)
    except av.error.FFmpegError as exc:
        raise MediaError(f"encoding {where} failed: {exc}") from None


class FileSink:
    """One output file, written atomically."""

    def __init__(self, path: str | Path, *, codec: str | None, crf: float, preset: str, temp_tag: str | None = None):
        self.path = Path(path)
        self.temp_tag = temp_tag  # see AtomicFile
        self.codec = codec or DEFAULT_CODEC
        self.crf, self.preset = crf, preset
        check_output(self.path)  # before any slow work
        if self.codec not in TUNED_CODECS:
            log.warning("--crf and --preset apply to %s only; %s runs with its defaults",
                        " and ".join(TUNED_CODECS), self.codec)
        self.target: AtomicFile | None = None
        self.container = None
        self._last_pts: int | None = None

    def open(self, info: VideoInfo, copied: list) -> str:
        self.info = info
        self.pix_fmt = output_pix_fmt(info, self.codec)
        self.target = AtomicFile(self.path, tag=self.temp_tag)
        try:
            self._open(copied)
        except BaseException:
            self.abort()
            raise
        return self.pix_fmt

    def _open(self, copied: list, *, retrying: bool = False) -> None:
        try:
            self.container = av.open(ffmpeg_url(self.target.tmp), "w")
        except (av.error.FFmpegError, ValueError) as exc:
            raise MediaError(f"cannot write {self.path.suffix} files: {exc}") from None
        self.video = add_video_stream(self.container, self.info, codec=self.codec, crf=self.crf,
                                      preset=self.preset, pix_fmt=self.pix_fmt, where=self.path.suffix)
        self.stream_map = {}
        for s in copied:
            try:
                out = self.container.add_stream_from_template(s)
            except (ValueError, av.error.FFmpegError) as exc:
                if s.type not in ("data", "video"):
                    raise MediaError(f"{self.path.suffix} cannot hold {s.type} stream #{s.index} "
                                     f"({s.codec_context.name}): {exc}; write .mkv instead") from None
                log.warning("dropping %s stream #%d: %s cannot hold it",
                            "cover art" if s.type == "video" else "data", s.index, self.path.suffix)
                continue
            if s.type == "video":  # cover art stays cover art
                out.disposition = av.stream.Disposition.attached_pic
            self.stream_map[s.index] = out
        try:
            self.container.start_encoding()
        except av.error.FFmpegError as exc:
            optional = [s for s in copied if s.type in ("data", "video") and s.index in self.stream_map]
            if retrying or not optional:
                raise MediaError(f"cannot start writing {self.path}: {exc}") from None
            # Some muxers accept a data stream or cover art but cannot write its header: drop those and retry.
            log.warning("dropping stream(s) %s: %s cannot hold them",
                        ", ".join(f"#{s.index}" for s in optional), self.path.suffix)
            self.container.close()
            self._open([s for s in copied if s not in optional], retrying=True)

    def write(self, frame: av.VideoFrame, pts: int) -> None:
        if self._last_pts is not None and pts <= self._last_pts:  # sources guarantee this; say so if not
            raise MediaError(f"internal error: frame timestamps must increase ({pts} after {self._last_pts})")
        self._last_pts = pts
        frame.pts = pts
        frame.time_base = self.info.time_base
        frame.pict_type = av.video.frame.PictureType.NONE  # let the encoder choose frame types
        encode(self.video, self.container, frame, str(self.path))

    def copy(self, packet: av.Packet) -> None:
        out = self.stream_map.get(packet.stream.index)
        if out is not None:
            index = packet.stream.index
            packet.stream = out
            try:
                self.container.mux(packet)
            except av.error.FFmpegError as exc:
                raise MediaError(f"copying stream #{index} into {self.path} failed: {exc}") from None

    def commit(self) -> Path:
        encode(self.video, self.container, None, str(self.path))
        try:
            self.container.close()
        except av.error.FFmpegError as exc:
            raise MediaError(f"finishing {self.path} failed: {exc}") from None
        self.container = None
        return self.target.commit()

    def abort(self) -> None:
        if self.container is not None:
            try:
                self.container.close()
            except Exception:  # the file is being thrown away; a close error changes nothing
                pass
            self.container = None
        if self.target is not None:
            self.target.abort()


def check_output(path: Path) -> None:
    """Fail fast, before any slow work, on an output that cannot be written."""
    if not path.suffix:
        raise MediaError(f"output {path} has no extension; use .mp4, .mkv or .mov")
    if path.is_dir():
        raise MediaError(f"output {path} is a folder; give a file name")
    try:
        probe = av.open("output" + path.suffix, "w")  # names the muxer FFmpeg would pick; creates no file
        muxer = probe.format.name
        probe.close()
    except (av.error.FFmpegError, ValueError):
        raise MediaError(f"output {path}: FFmpeg knows no format for {path.suffix}; use .mp4, .mkv or .mov") from None
    if muxer not in SINGLE_FILE_MUXERS:
        raise MediaError(f"output {path}: {path.suffix} ({muxer}) is not a single video file, and gpen-stream "
                         "writes one file atomically; use .mp4, .mkv or .mov (live streams can go to HLS: "
                         "gpen-stream live ... -o out.m3u8)")
    folder = path.parent
    if not folder.is_dir():
        raise MediaError(f"output folder does not exist: {folder}")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise MediaError(f"output folder is not writable: {folder}")
