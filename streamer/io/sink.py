"""The file sink: encode the restored video and copy the other streams into one file,
written to a temporary file beside the destination and renamed over it only when complete.

The video keeps the input's size, sample aspect, frame rate, time base and every frame's pts,
its rotation metadata and colour description; the other streams are copied packet for
packet. A data stream the output container cannot hold (e.g. a QuickTime timecode track in
.mp4) is dropped with a warning; an audio or subtitle stream it cannot hold is an error that
names a container that can (.mkv).
"""

from __future__ import annotations

import logging
import os
from fractions import Fraction
from pathlib import Path

import av

from configs.atomic import AtomicFile
from streamer.io.probe import MediaError, VideoInfo, ffmpeg_url
from streamer.io.yuv import PLANAR_YUV

log = logging.getLogger(__name__)

DEFAULT_CODEC = "libx264"
TUNED_CODECS = ("libx264", "libx265")  # the encoders --crf and --preset are passed to


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
        self.target = AtomicFile(self.path)
        self.tmp = self.target.tmp
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
            self.container = av.open(ffmpeg_url(self.tmp), "w")
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
        return self.target.commit()

    def abort(self) -> None:
        if self.container is not None:
            try:
                self.container.close()
            except Exception:  # the file is being thrown away; a close error changes nothing
                pass
        self.target.abort()


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
