"""A hostile-input corpus: malformed and unusual inputs (and outputs) for ``gpen-stream restore``,
each with the outcome users should get.

Everything is generated here, with PyAV and the ``ffmpeg`` CLI; nothing is downloaded. A case
is a name, a builder and a list of acceptable outcomes. The builder makes its files in an empty
folder (the run's working directory) and returns a :class:`Built`: the command-line arguments
after ``restore``, the files that must survive byte-identical, and what the run must do
(``expect``: one :class:`Outcome`, or several when either of two behaviours is correct, e.g.
"refuse with a clear message, or fully support it").

The table is ``CASES`` at the end (each with a one-line summary of the input and the expected
outcome). ``tests/test_hostile_inputs.py`` runs every case through the command line and checks,
on top of each case's outcome: no traceback, no hang, nothing left behind (no ``.part`` file,
no temporary folder, no worker process) and the input unchanged.

Clips are tiny (128x96, 20 frames, 25 fps) so the whole corpus runs in a couple of minutes.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Callable

import av
import cv2
import numpy as np

from tests.support.clips import make_clip

W, H, N = 128, 96, 20  # the base clip: size and frame count
FPS = 25


# ---------------------------------------------------------------------- what a case expects


@dataclass
class Outcome:
    """One acceptable result of a run.

    ``rc``: the exit code (0 done, 1 failed; a tuple accepts any of them). Failures must print a
    message on stderr matching ``message`` (a case-insensitive regex) and write no output.
    Successes must write ``output`` with exactly ``frames`` video frames (counted by ``ffprobe
    -count_frames``), strictly increasing timestamps, a ``done`` summary that agrees, and pass
    ``check(output, summary)`` (raises AssertionError) if given.
    """

    rc: int | tuple[int, ...]
    message: str | None = None
    frames: int | None = None
    check: Callable[[Path, dict], None] | None = None
    note: str = ""

    def describe(self) -> str:
        if self.rc == 0:
            frames = "" if self.frames is None else f", {self.frames} frames"
            return f"success{frames}{'; ' + self.note if self.note else ''}"
        return f"exit {self.rc}, message /{self.message}/{'; ' + self.note if self.note else ''}"


def fails(message: str, rc: int | tuple[int, ...] = 1, note: str = "") -> Outcome:
    return Outcome(rc=rc, message=message, note=note)


def succeeds(frames: int, check: Callable[[Path, dict], None] | None = None, note: str = "") -> Outcome:
    return Outcome(rc=0, frames=frames, check=check, note=note)


@dataclass
class Built:
    args: list[str]  # after ``restore``; relative paths are relative to the case folder
    expect: list[Outcome]
    output: str = "out.mp4"  # the output the run is about (relative to the case folder)
    protected: list[str] = field(default_factory=list)  # must be byte-identical afterwards
    allowed_new: list[str] = field(default_factory=list)  # files a successful run may create besides output
    cleanup: Callable[[], None] | None = None
    skip: str | None = None  # the environment cannot build this case (reason)
    tmp_subdir: str = ""  # run with TMPDIR this much deeper than the case's own temporary folder
    timeout_s: float = 120.0


@dataclass
class Case:
    name: str
    build: Callable[[Path, "Sources"], Built]
    summary: str  # what the input is and what must happen, for humans

    def __repr__(self) -> str:
        return self.name


# ---------------------------------------------------------------------- shared sources


class Sources:
    """Files several cases start from, generated once per session (``root`` is a scratch folder)."""

    def __init__(self, root: Path):
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.base = make_clip(root / "base.mp4", frames=N, width=W, height=H, face_px=40, crf=18, audio=True)
        self._cache: dict[str, Path] = {}

    @property
    def base_faces(self) -> Path:
        return self.base.faces_path

    def ffmpeg(self, name: str, *args: str) -> Path:
        """``ffmpeg -i base.mp4 ARGS root/name``, made once."""
        if name not in self._cache:
            run_ffmpeg("-i", str(self.base.path), *args, str(self.root / name))
            self._cache[name] = self.root / name
        return self._cache[name]

    # sources used by more than one case
    def faststart(self) -> Path:
        return self.ffmpeg("faststart.mp4", "-c", "copy", "-movflags", "+faststart")

    def clustered_mkv(self) -> Path:
        """Short GOPs and small clusters, as a camera or a streaming remux writes them."""
        return self.ffmpeg("clustered.mkv", "-c:v", "libx264", "-crf", "23", "-g", "5", "-bf", "0", "-c:a", "copy",
                           "-cluster_time_limit", "150", "-cluster_size_limit", "4000")

    def gop_mp4(self) -> Path:
        return self.ffmpeg("gop.mp4", "-an", "-c:v", "libx264", "-crf", "23", "-g", "10", "-bf", "0")

    def segment_ts(self) -> Path:
        return self.ffmpeg("segment.ts", "-an", "-c:v", "libx264", "-crf", "23", "-bf", "0", "-g", "10")


def run_ffmpeg(*args: str) -> None:
    subprocess.run(["ffmpeg", "-v", "error", "-nostdin", "-y", *args], check=True, capture_output=True, timeout=120)


def ffprobe_streams(path: Path | str, count: bool = True, cwd: Path | None = None) -> list[dict]:
    """ffprobe's streams (with ``nb_read_frames`` when ``count``), as dicts."""
    cmd = ["ffprobe", "-v", "error", "-show_streams", "-show_entries", "stream_side_data", "-of", "json"]
    if count:
        cmd.insert(3, "-count_frames")
    out = subprocess.run([*cmd, str(path)], capture_output=True, text=True, timeout=120, cwd=cwd)
    if out.returncode != 0:
        raise AssertionError(f"ffprobe cannot read {path}: {out.stderr.strip()[:500]}")
    return json.loads(out.stdout).get("streams", [])


def main_video(streams: list[dict]) -> dict:
    video = [s for s in streams if s["codec_type"] == "video" and not s.get("disposition", {}).get("attached_pic")]
    assert video, f"no video stream in {[s['codec_type'] for s in streams]}"
    return video[0]


def counted_frames(path: Path | str, cwd: Path | None = None) -> int:
    """The video frames ffprobe decodes (what a player shows: edit lists applied)."""
    return int(main_video(ffprobe_streams(path, cwd=cwd))["nb_read_frames"])


def frame_times(path: Path | str, cwd: Path | None = None) -> list[float | None]:
    """Presentation times (s) of the main video stream's decoded frames, in output order."""
    index = main_video(ffprobe_streams(path, count=False, cwd=cwd))["index"]
    out = subprocess.run(["ffprobe", "-v", "error", "-select_streams", str(index), "-show_entries",
                          "frame=pts_time", "-of", "json", str(path)], capture_output=True, text=True, timeout=120,
                         cwd=cwd)
    assert out.returncode == 0, out.stderr
    return [float(f["pts_time"]) if "pts_time" in f and f["pts_time"] != "N/A" else None
            for f in json.loads(out.stdout).get("frames", [])]


def rotation_of(stream: dict) -> int:
    for sd in stream.get("side_data_list", []):
        if "rotation" in sd:
            return int(sd["rotation"])
    return 0


def _copy(src: Path, dst: Path) -> Path:
    shutil.copyfile(src, dst)
    return dst


def _empty_faces(folder: Path) -> str:
    (folder / "faces.jsonl").write_text("")
    return "faces.jsonl"


def _with_faces(folder: Path, src: Sources) -> str:
    _copy(src.base_faces, folder / "faces.jsonl")
    return "faces.jsonl"


def _assert_counts(path: Path, frames: int) -> None:
    got = counted_frames(path)
    assert got == frames, f"generator: {path.name} has {got} frames, meant {frames}"


def _write_video(path: Path, frames: list[np.ndarray], codec: str, pix_fmt: str, *, rate: int = FPS,
                 options: dict | None = None, pts_ms: list[int] | None = None) -> None:
    """Encode RGB frames with PyAV (``pts_ms``: packet timestamps in ms, for Matroska)."""
    with av.open(str(path), "w") as out:
        s = out.add_stream(codec, rate=rate, options=options or {})
        s.height, s.width = frames[0].shape[:2]
        s.pix_fmt = pix_fmt
        if pts_ms is not None:
            s.time_base = Fraction(1, 1000)
        packets = []
        for i, img in enumerate(frames):
            f = av.VideoFrame.from_ndarray(img, format="rgb24")
            f.pts, f.time_base = i, Fraction(1, rate)
            packets += s.encode(f)
        packets += s.encode(None)
        for i, p in enumerate(packets):
            if pts_ms is not None:
                p.pts = p.dts = pts_ms[i]
                p.time_base = Fraction(1, 1000)
            out.mux(p)


def _base_rgb(src: Sources) -> list[np.ndarray]:
    with av.open(str(src.base.path)) as c:
        return [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]


# ---------------------------------------------------------------------- extra checks for successes


def _check_size(width: int, height: int):
    def check(out: Path, _summary: dict) -> None:
        v = main_video(ffprobe_streams(out, count=False))
        assert (v["width"], v["height"]) == (width, height), f"size {v['width']}x{v['height']}, want {width}x{height}"
    return check


def _check_deltas(step_s: float):
    """Every frame follows the previous one by about one frame interval (no collapse, no jump)."""
    def check(out: Path, _summary: dict) -> None:
        times = frame_times(out)
        deltas = np.diff(times)
        bad = [(i, round(float(d), 4)) for i, d in enumerate(deltas) if not 0.5 * step_s <= d <= 1.5 * step_s]
        assert not bad, f"frame intervals should all be ~{step_s} s; (index, interval) off: {bad[:8]}; times {times}"
    return check


def _all(*checks):
    def check(out: Path, summary: dict) -> None:
        for c in checks:
            c(out, summary)
    return check


# ---------------------------------------------------------------------- builders: not a video at all


def b_zero_bytes(d: Path, src: Sources) -> Built:
    (d / "clip.mp4").write_bytes(b"")
    return Built(["clip.mp4", "-o", "out.mp4", "--faces", _empty_faces(d)], [fails(r"empty")], protected=["clip.mp4"])


def b_random_bytes(d: Path, src: Sources) -> Built:
    (d / "clip.mp4").write_bytes(random.Random(7).randbytes(65536))
    return Built(["clip.mp4", "-o", "out.mp4", "--faces", _empty_faces(d)], [fails(r"not a (readable )?video")],
                 protected=["clip.mp4"])


def b_zeros_mkv(d: Path, src: Sources) -> Built:
    (d / "clip.mkv").write_bytes(bytes(65536))
    return Built(["clip.mkv", "-o", "out.mkv", "--faces", _empty_faces(d)], [fails(r"not a (readable )?video")],
                 output="out.mkv", protected=["clip.mkv"])


def b_mp4_header_then_garbage(d: Path, src: Sources) -> Built:
    head = src.faststart().read_bytes()[:1500]  # ftyp + the start of the moov
    (d / "clip.mp4").write_bytes(head + random.Random(3).randbytes(30000))
    return Built(["clip.mp4", "-o", "out.mp4", "--faces", _empty_faces(d)],
                 [fails(r"truncat|corrupt|undecodable|could not be decoded")], protected=["clip.mp4"])


def b_audio_only(d: Path, src: Sources) -> Built:
    run_ffmpeg("-i", str(src.base.path), "-vn", "-c:a", "copy", str(d / "song.m4a"))
    return Built(["song.m4a", "-o", "out.mp4", "--faces", _empty_faces(d)], [fails(r"no video stream")],
                 protected=["song.m4a"])


def b_image_png(d: Path, src: Sources) -> Built:
    cv2.imwrite(str(d / "face.png"), cv2.cvtColor(_base_rgb(src)[0], cv2.COLOR_RGB2BGR))
    return Built(["face.png", "-o", "out.mp4", "--faces", _empty_faces(d)],
                 [fails(r"image", note="a still image is not a video")], protected=["face.png"])


def b_jpeg_named_mp4(d: Path, src: Sources) -> Built:
    _, buf = cv2.imencode(".jpg", cv2.cvtColor(_base_rgb(src)[0], cv2.COLOR_RGB2BGR))
    (d / "clip.mp4").write_bytes(buf.tobytes())
    return Built(["clip.mp4", "-o", "out.mp4", "--faces", _empty_faces(d)],
                 [fails(r"image", note="a JPEG named .mp4 is a still image, not a video")], protected=["clip.mp4"])


def b_directory(d: Path, src: Sources) -> Built:
    (d / "clip.mp4").mkdir()
    return Built(["clip.mp4", "-o", "out.mp4", "--faces", _empty_faces(d)], [fails(r"not a file")])


def b_dev_zero(d: Path, src: Sources) -> Built:
    return Built(["/dev/zero", "-o", "out.mp4", "--faces", _empty_faces(d)], [fails(r"not a (regular )?file")],
                 timeout_s=30)


# ---------------------------------------------------------------------- truncated files


def _truncated(name: str, source: Callable[[Sources], Path], keep: Callable[[int], int], message: str):
    def build(d: Path, src: Sources) -> Built:
        data = source(src).read_bytes()
        suffix = source(src).suffix
        cut = keep(len(data))
        if isinstance(cut, tuple):  # ("box", kind, index, fraction)
            offset, size = _box_offsets(data, cut[1])[cut[2]]
            cut = offset + int(size * cut[3])
        (d / f"clip{suffix}").write_bytes(data[:cut])
        return Built([f"clip{suffix}", "-o", f"out{suffix}", "--faces", _with_faces(d, src)], [fails(message)],
                     output=f"out{suffix}", protected=[f"clip{suffix}"])
    build.__name__ = f"b_{name}"
    return build


TRUNCATED = r"truncat|ends early|incomplete"


def _box_offsets(data: bytes, kind: bytes) -> list[tuple[int, int]]:
    """(offset, size) of the mp4 boxes of this type at the top level and inside moov."""
    found, stack = [], [(0, len(data))]
    while stack:
        start, end = stack.pop()
        i = start
        while i + 8 <= end:
            size, name = int.from_bytes(data[i:i + 4], "big"), data[i + 4:i + 8]
            if size < 8:
                break
            if name == kind:
                found.append((i, size))
            if name in (b"moov", b"trak"):
                stack.append((i + 8, i + size))
            i += size
    return sorted(found)


def _in_box(kind: bytes, index: int, fraction: float):
    """A cut point ``fraction`` of the way into the ``index``-th ``kind`` box of the base clip
    (bound when the case is built: see _truncated)."""
    return ("box", kind, index, fraction)


# ---------------------------------------------------------------------- sizes and pixel formats


def b_one_by_one(d: Path, src: Sources) -> Built:
    frames = [np.full((1, 1, 3), 40 * i, np.uint8) for i in range(5)]
    _write_video(d / "dot.mkv", frames, "ffv1", "yuv444p")
    _assert_counts(d / "dot.mkv", 5)
    return Built(["dot.mkv", "-o", "out.mkv", "--faces", _empty_faces(d)], [succeeds(5, _check_size(1, 1))],
                 output="out.mkv", protected=["dot.mkv"])


def b_odd_size(d: Path, src: Sources) -> Built:
    clip = make_clip(d / "odd.mp4", frames=8, width=97, height=73, face_px=34, audio=False)
    _copy(clip.faces_path, d / "faces.jsonl")
    return Built(["odd.mp4", "-o", "out.mp4", "--faces", "faces.jsonl"], [succeeds(8, _check_size(97, 73))],
                 protected=["odd.mp4", "faces.jsonl"])


def _pix_fmt(name: str, codec: str, pix_fmt: str, container: str, extra: tuple[str, ...] = (),
             decoded: str | None = None):
    """The base clip re-encoded as ``codec``/``pix_fmt``; ``decoded``: the format it decodes to."""
    def build(d: Path, src: Sources) -> Built:
        clip = f"clip.{container}"
        run_ffmpeg("-i", str(src.base.path), "-an", "-c:v", codec, "-pix_fmt", pix_fmt, *extra, str(d / clip))
        probe = main_video(ffprobe_streams(d / clip))
        assert probe["pix_fmt"] == (decoded or pix_fmt) and int(probe["nb_read_frames"]) == N, f"generator: {probe}"
        out = "out.mkv" if container in ("mkv", "nut", "avi") else "out.mp4"
        return Built([clip, "-o", out, "--faces", _with_faces(d, src)], [succeeds(N, _check_size(W, H))],
                     output=out, protected=[clip])
    build.__name__ = f"b_{name}"
    return build


def b_gif(d: Path, src: Sources) -> Built:
    run_ffmpeg("-i", str(src.base.path), "-an", str(d / "anim.gif"))
    _assert_counts(d / "anim.gif", N)
    return Built(["anim.gif", "-o", "out.mp4", "--faces", _with_faces(d, src)],
                 [succeeds(N, _check_size(W, H), note="an animated GIF is a (pal8) video")], protected=["anim.gif"])


# ---------------------------------------------------------------------- timestamps


def b_vfr_jumps_and_duplicate_pts(d: Path, src: Sources) -> Built:
    # 40 ms steps, a 3 s jump after frame 4, and two repeated timestamps (frames 7 and 11)
    pts, t = [], 0
    for i in range(N):
        if i == 5:
            t += 3000
        elif i in (7, 11):
            pass  # the same pts as the previous frame
        elif i:
            t += 40
        pts.append(t)
    _write_video(d / "vfr.mkv", _base_rgb(src), "ffv1", "yuv420p", pts_ms=pts)
    _assert_counts(d / "vfr.mkv", N)

    def check(out: Path, _summary: dict) -> None:
        times = frame_times(out)
        assert times[5] - times[4] > 2.5, f"the 3 s jump was not kept: {times}"
        assert abs((times[-1] - times[0]) - pts[-1] / 1000) < 0.1, f"duration changed: {times}"
    return Built(["vfr.mkv", "-o", "out.mkv", "--faces", _with_faces(d, src)], [succeeds(N, check)], output="out.mkv",
                 protected=["vfr.mkv"])


def _clear_pes_timestamps(data: bytearray, which: Callable[[int], bool]) -> int:
    """Remove PTS/DTS from the video PES packets whose index satisfies ``which`` (the header
    bytes become stuffing, so no length changes). Returns how many were cleared."""
    cleared, n_pes = 0, 0
    for off in range(0, len(data) - 187, 188):
        assert data[off] == 0x47, "not a 188-byte transport stream"
        if not data[off + 1] & 0x40:  # payload_unit_start_indicator
            continue
        afc = (data[off + 3] >> 4) & 3
        p = off + 4 + (1 + data[off + 4] if afc & 2 else 0)
        if not afc & 1 or data[p:p + 4] != b"\x00\x00\x01\xe0":
            continue
        if which(n_pes) and data[p + 7] & 0xC0:
            data[p + 7] &= 0x3F
            for i in range(p + 9, p + 9 + data[p + 8]):
                data[i] = 0xFF
            cleared += 1
        n_pes += 1
    return cleared


def _pts_missing(which: Callable[[int], bool], count: int):
    def build(d: Path, src: Sources) -> Built:
        data = bytearray(src.segment_ts().read_bytes())
        assert _clear_pes_timestamps(data, which) == count
        (d / "clip.ts").write_bytes(bytes(data))
        with av.open(str(d / "clip.ts")) as c:
            own = [f.time for f in c.decode(video=0)]
        missing = sum(t is None for t in own)
        assert missing == count, f"generator: {missing} frames without pts, meant {count}"
        return Built(["clip.ts", "-o", "out.mkv", "--faces", _with_faces(d, src)],
                     [succeeds(N, _all(_check_deltas(1 / FPS), _check_own_times(own)),
                               note="every frame ~40 ms after the previous one, those with a pts at it")],
                     output="out.mkv", protected=["clip.ts"])
    return build


def _check_own_times(own: list[float | None]):
    """Frames that had a timestamp keep it (the sound, copied with its own, stays with them)."""
    def check(out: Path, _summary: dict) -> None:
        times = frame_times(out)
        moved = [(i, t, round(times[i], 3)) for i, t in enumerate(own) if t is not None and abs(times[i] - t) > 0.002]
        assert not moved, f"(index, own time, output time) of frames that lost their timestamp: {moved[:8]}"
    return check


def b_mp4_cut_with_edit_list(d: Path, src: Sources) -> Built:
    run_ffmpeg("-ss", "0.5", "-i", str(src.base.path), "-c", "copy", str(d / "cut.mp4"))
    shown = counted_frames(d / "cut.mp4")
    with av.open(str(d / "cut.mp4")) as c:
        stored = c.streams.video[0].frames
    assert 0 < shown < stored, f"generator: the cut should carry an edit list ({shown} shown, {stored} stored)"
    # the frames a player shows, as ffmpeg decodes them
    first_shown = subprocess.run(["ffmpeg", "-v", "error", "-i", str(d / "cut.mp4"), "-frames:v", "1", "-f", "rawvideo",
                                  "-pix_fmt", "rgb24", "-"], capture_output=True, check=True).stdout

    def check(out: Path, _summary: dict) -> None:
        got = subprocess.run(["ffmpeg", "-v", "error", "-i", str(out), "-frames:v", "1", "-f", "rawvideo",
                              "-pix_fmt", "rgb24", "-"], capture_output=True, check=True).stdout
        a = np.frombuffer(got, np.uint8).astype(float)
        b = np.frombuffer(first_shown, np.uint8).astype(float)
        assert a.shape == b.shape
        psnr = 10 * np.log10(255**2 / max(1e-9, float(np.mean((a - b) ** 2))))
        assert psnr > 30, f"the output's first frame is not the first frame a player shows (PSNR {psnr:.1f} dB)"
        times = frame_times(out)
        assert times[0] < 0.05, f"output starts at {times[0]} s, not at the start"
    return Built(["cut.mp4", "-o", "out.mp4", "--faces", _empty_faces(d)],
                 [succeeds(shown, check, note="the frames a player shows (edit list applied)")], protected=["cut.mp4"])


# ---------------------------------------------------------------------- metadata and streams


def b_rotation(d: Path, src: Sources) -> Built:
    clip = make_clip(d / "rot.mp4", frames=8, width=96, height=128, face_px=40, rotation=90, audio=False)
    _copy(clip.faces_path, d / "faces.jsonl")
    want = rotation_of(main_video(ffprobe_streams(d / "rot.mp4", count=False)))
    assert want != 0

    def check(out: Path, _summary: dict) -> None:
        got = rotation_of(main_video(ffprobe_streams(out, count=False)))
        assert got == want, f"rotation {got}, want {want}"
    return Built(["rot.mp4", "-o", "out.mp4", "--faces", "faces.jsonl"], [succeeds(8, check)],
                 protected=["rot.mp4", "faces.jsonl"])


def b_interlaced(d: Path, src: Sources) -> Built:
    run_ffmpeg("-i", str(src.base.path), "-an", "-c:v", "libx264", "-crf", "20", "-flags", "+ildct+ilme", "-top", "1",
               "-field_order", "tt", str(d / "tff.mkv"))
    v = main_video(ffprobe_streams(d / "tff.mkv"))
    assert v.get("field_order") == "tt" and int(v["nb_read_frames"]) == N, f"generator: {v}"

    def check(out: Path, _summary: dict) -> None:
        got = main_video(ffprobe_streams(out, count=False)).get("field_order")
        assert got == "tt", f"field order {got!r}, want 'tt' (top field first) as in the input"
    return Built(["tff.mkv", "-o", "out.mkv", "--faces", _with_faces(d, src)],
                 [succeeds(N, check, note="field order (tt) kept")], output="out.mkv", protected=["tff.mkv"])


def b_two_video_streams(d: Path, src: Sources) -> Built:
    run_ffmpeg("-f", "lavfi", "-i", "testsrc=size=64x48:rate=25:duration=1.2", "-c:v", "libx264", str(d / "other.mp4"))
    run_ffmpeg("-i", str(src.base.path), "-i", str(d / "other.mp4"), "-map", "0:v", "-map", "1:v", "-map", "0:a",
               "-c", "copy", str(d / "two.mkv"))
    (d / "other.mp4").unlink()
    streams = ffprobe_streams(d / "two.mkv")
    assert [s["codec_type"] for s in streams] == ["video", "video", "audio"]
    assert [int(s["nb_read_frames"]) for s in streams[:2]] == [N, 30]
    return Built(["two.mkv", "-o", "out.mkv", "--faces", _with_faces(d, src)],
                 [succeeds(N, _check_size(W, H), note="the first video stream is restored")], output="out.mkv",
                 protected=["two.mkv"])


def _srt(d: Path) -> Path:
    srt = d / "subs.srt"
    srt.write_text("1\n00:00:00,000 --> 00:00:00,300\nHello\n\n2\n00:00:00,300 --> 00:00:00,700\nWorld\n")
    return srt


def b_subtitles_mkv(d: Path, src: Sources) -> Built:
    run_ffmpeg("-i", str(src.base.path), "-i", str(_srt(d)), "-map", "0", "-map", "1", "-c:v", "copy", "-c:a", "copy",
               "-c:s", "srt", str(d / "subs.mkv"))
    (d / "subs.srt").unlink()

    def check(out: Path, _summary: dict) -> None:
        kinds = [s["codec_type"] for s in ffprobe_streams(out, count=False)]
        assert kinds.count("subtitle") == 1 and kinds.count("audio") == 1, kinds
    return Built(["subs.mkv", "-o", "out.mkv", "--faces", _with_faces(d, src)], [succeeds(N, check)], output="out.mkv",
                 protected=["subs.mkv"])


def b_subtitles_into_mp4(d: Path, src: Sources) -> Built:
    run_ffmpeg("-i", str(src.base.path), "-i", str(_srt(d)), "-map", "0", "-map", "1", "-c:v", "copy", "-c:a", "copy",
               "-c:s", "srt", str(d / "subs.mkv"))
    (d / "subs.srt").unlink()
    return Built(["subs.mkv", "-o", "out.mp4", "--faces", _with_faces(d, src)], [fails(r"\.mkv")],
                 protected=["subs.mkv"])


def b_cover_art(d: Path, src: Sources) -> Built:
    cv2.imwrite(str(d / "cover.png"), np.full((32, 32, 3), 200, np.uint8))
    run_ffmpeg("-i", str(src.base.path), "-i", str(d / "cover.png"), "-map", "0", "-map", "1", "-c", "copy",
               "-disposition:v:1", "attached_pic", str(d / "tagged.mp4"))
    (d / "cover.png").unlink()
    assert sum(s.get("disposition", {}).get("attached_pic", 0) for s in ffprobe_streams(d / "tagged.mp4")) == 1

    def check(out: Path, _summary: dict) -> None:
        streams = ffprobe_streams(out, count=False)
        pics = [s for s in streams if s.get("disposition", {}).get("attached_pic")]
        assert len(pics) == 1, f"the cover art was not kept: {[(s['codec_type'], s['codec_name']) for s in streams]}"
        assert [s["codec_type"] for s in streams].count("audio") == 1
    return Built(["tagged.mp4", "-o", "out.mp4", "--faces", _with_faces(d, src)],
                 [succeeds(N, check, note="the cover art is kept")], protected=["tagged.mp4"])


def b_mov_timecode_into_mp4(d: Path, src: Sources) -> Built:
    run_ffmpeg("-i", str(src.base.path), "-c", "copy", "-timecode", "01:00:00:00", str(d / "cam.mov"))
    assert any(s["codec_type"] == "data" for s in ffprobe_streams(d / "cam.mov", count=False))
    return Built(["cam.mov", "-o", "out.mp4", "--faces", _with_faces(d, src)],
                 [succeeds(N, note="the timecode track is dropped with a warning")], protected=["cam.mov"])


# ---------------------------------------------------------------------- damaged data


def _concealed_source(d: Path, src: Sources) -> Path:
    """A P frame whose slice data is damaged: FFmpeg conceals it ("error while decoding MB")
    and still outputs a frame."""
    data = bytearray(src.gop_mp4().read_bytes())
    with av.open(str(src.gop_mp4())) as c:
        victim = [p for p in c.demux(video=0) if p.size and not p.is_keyframe][5]
        pos, size = victim.pos, victim.size
    for i in range(pos + 8 + size // 4, pos + size - 2, 3):
        data[i] ^= 0x5A
    (d / "clip.mp4").write_bytes(bytes(data))
    log = subprocess.run(["ffmpeg", "-v", "error", "-i", str(d / "clip.mp4"), "-f", "null", "-"], capture_output=True,
                         text=True).stderr
    assert "error while decoding MB" in log, f"generator: no concealment: {log}"
    _assert_counts(d / "clip.mp4", N)  # the frame is concealed, not dropped
    return d / "clip.mp4"


def b_concealed_frames_skip(d: Path, src: Sources) -> Built:
    _concealed_source(d, src)

    def check(out: Path, summary: dict) -> None:
        counted = summary.get("corrupt_frames", 0) + summary.get("concealed_frames", 0)
        assert counted >= 1, f"the concealed frame was not counted: {summary}"
    return Built(["clip.mp4", "-o", "out.mp4", "--faces", _with_faces(d, src)],
                 [succeeds(N, check, note="the concealed frame is counted (corrupt_frames or concealed_frames >= 1)"),
                  succeeds(N - 1, check, note="or skipped and counted")], protected=["clip.mp4"])


def b_concealed_frames_fail(d: Path, src: Sources) -> Built:
    _concealed_source(d, src)
    return Built(["clip.mp4", "-o", "out.mp4", "--faces", _with_faces(d, src), "--corrupt-frames", "fail"],
                 [fails(r"undecodable|corrupt")], protected=["clip.mp4"])


def b_mkv_damaged_middle(d: Path, src: Sources) -> Built:
    data = bytearray(src.clustered_mkv().read_bytes())
    n = len(data)
    data[n // 3:n // 2] = bytes(n // 2 - n // 3)
    (d / "clip.mkv").write_bytes(bytes(data))
    shown = counted_frames(d / "clip.mkv")
    assert shown < N, f"generator: the damage lost no frame ({shown})"

    def check(out: Path, summary: dict) -> None:
        lost = N - counted_frames(out)
        reported = summary.get("corrupt_frames", 0) >= lost or summary.get("damaged_spots", 0) >= 1
        assert lost > 0 and reported, f"{lost} frames lost silently: {summary}"
    return Built(["clip.mkv", "-o", "out.mkv", "--faces", _with_faces(d, src)],
                 [fails(r"corrupt|damaged|truncat|ends early|missing"),
                  Outcome(rc=0, frames=None, check=check,
                          note="or succeed, reporting the damage (damaged_spots, or every lost frame counted)")],
                 output="out.mkv", protected=["clip.mkv"])


# ---------------------------------------------------------------------- playlists, protocols, URLs


def _two_clips(d: Path, src: Sources) -> None:
    for name, count in (("a.mp4", 5), ("b.mp4", 7)):
        run_ffmpeg("-i", str(src.base.path), "-frames:v", str(count), "-an", "-c:v", "libx264", str(d / name))


PLAYLIST = r"playlist|concat|hls|dash|manifest|sequence"


def b_hls_local(d: Path, src: Sources) -> Built:
    _copy(src.segment_ts(), d / "seg0.ts")
    (d / "list.m3u8").write_text("#EXTM3U\n#EXT-X-VERSION:3\n#EXT-X-TARGETDURATION:1\n#EXTINF:0.8,\nseg0.ts\n"
                                 "#EXT-X-ENDLIST\n")
    return Built(["list.m3u8", "-o", "out.mp4", "--faces", _empty_faces(d)], [fails(PLAYLIST)],
                 protected=["list.m3u8", "seg0.ts"])


def b_hls_http(d: Path, src: Sources) -> Built:
    (d / "list.m3u8").write_text("#EXTM3U\n#EXT-X-VERSION:3\n#EXT-X-TARGETDURATION:1\n#EXTINF:0.8,\n"
                                 "http://127.0.0.1:9/seg0.ts\n#EXT-X-ENDLIST\n")
    return Built(["list.m3u8", "-o", "out.mp4", "--faces", _empty_faces(d)], [fails(PLAYLIST)],
                 protected=["list.m3u8"], timeout_s=30)


def b_hls_fifo_segment(d: Path, src: Sources) -> Built:
    """A playlist whose segment is a FIFO nobody writes: opening it would hang forever."""
    os.mkfifo(d / "seg0.ts")
    (d / "list.m3u8").write_text("#EXTM3U\n#EXT-X-VERSION:3\n#EXT-X-TARGETDURATION:1\n#EXTINF:0.8,\nseg0.ts\n"
                                 "#EXT-X-ENDLIST\n")
    return Built(["list.m3u8", "-o", "out.mp4", "--faces", _empty_faces(d)],
                 [fails(PLAYLIST, note="without opening the segment (a FIFO: no hang)")], protected=["list.m3u8"],
                 timeout_s=30)


def b_ffconcat_list(d: Path, src: Sources) -> Built:
    _two_clips(d, src)
    (d / "list.txt").write_text("ffconcat version 1.0\nfile 'a.mp4'\nfile 'b.mp4'\n")
    return Built(["list.txt", "-o", "out.mp4", "--faces", _empty_faces(d)], [fails(PLAYLIST)],
                 protected=["list.txt", "a.mp4", "b.mp4"])


def b_ffconcat_named_mp4(d: Path, src: Sources) -> Built:
    _two_clips(d, src)
    (d / "list.mp4").write_text("ffconcat version 1.0\nfile '/etc/hostname'\nfile 'a.mp4'\nfile 'b.mp4'\n")
    return Built(["list.mp4", "-o", "out.mp4", "--faces", _empty_faces(d)],
                 [fails(PLAYLIST + r"|not a (readable )?video")], protected=["list.mp4", "a.mp4", "b.mp4"])


def b_dash_manifest(d: Path, src: Sources) -> Built:
    run_ffmpeg("-i", str(src.base.path), "-an", "-c:v", "copy", "-f", "dash", str(d / "stream.mpd"))
    return Built(["stream.mpd", "-o", "out.mp4", "--faces", _empty_faces(d)], [fails(PLAYLIST)],
                 protected=["stream.mpd"])


def b_concat_protocol_argument(d: Path, src: Sources) -> Built:
    _two_clips(d, src)
    return Built(["concat:a.mp4|b.mp4", "-o", "out.mp4", "--faces", _empty_faces(d)],
                 [fails(r"not found", note="a name, never a protocol")], protected=["a.mp4", "b.mp4"])


def b_file_named_concat(d: Path, src: Sources) -> Built:
    _two_clips(d, src)  # 5 + 7 frames: the concat protocol would give 12
    run_ffmpeg("-i", str(src.base.path), "-frames:v", "9", "-an", "-c:v", "libx264", str(d / "concat:a.mp4|b.mp4"))
    return Built(["concat:a.mp4|b.mp4", "-o", "out.mp4", "--faces", _empty_faces(d)],
                 [succeeds(9, note="the file of that name, not the concat protocol")],
                 protected=["concat:a.mp4|b.mp4", "a.mp4", "b.mp4"])


def b_http_url(d: Path, src: Sources) -> Built:
    return Built(["http://127.0.0.1:9/clip.mp4", "-o", "out.mp4", "--faces", _empty_faces(d)],
                 [fails(r"not found", note="URLs are not fetched")], timeout_s=30)


def b_file_named_like_url(d: Path, src: Sources) -> Built:
    (d / "http:" / "host").mkdir(parents=True)
    _copy(src.base.path, d / "http:" / "host" / "clip.mp4")
    return Built(["http://host/clip.mp4", "-o", "out.mp4", "--faces", _with_faces(d, src)],
                 [succeeds(N, note="the local file http:/host/clip.mp4")], protected=["http:/host/clip.mp4"])


def b_image_sequence_pattern(d: Path, src: Sources) -> Built:
    for i, img in enumerate(_base_rgb(src)[:5], 1):
        cv2.imwrite(str(d / f"img{i:03d}.png"), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
    return Built(["img%03d.png", "-o", "out.mp4", "--faces", _empty_faces(d)],
                 [fails(r"not found", note="a name, never a pattern")], protected=["img001.png"])


def b_workers_2_long_tmpdir(d: Path, src: Sources) -> Built:
    """Two worker processes, started from a TMPDIR about 110 characters long (as pytest's, or macOS's
    /var/folders/..., can be): their ipc:// sockets must still work (a Unix socket path is
    limited to 107 bytes)."""
    _copy(src.base.path, d / "clip.mp4")
    return Built(["clip.mp4", "-o", "out.mp4", "--faces", _with_faces(d, src), "--workers", "2"],
                 [succeeds(N, note="with two worker processes")], protected=["clip.mp4"],
                 tmp_subdir="a-rather-long-folder-name/another-long-folder-name", timeout_s=180)


# ---------------------------------------------------------------------- outputs


def _output_format(out: str, names: str):
    def build(d: Path, src: Sources) -> Built:
        _copy(src.base.path, d / "clip.mp4")
        return Built(["clip.mp4", "-o", out, "--faces", _with_faces(d, src)],
                     [fails(names, rc=(1, 2), note="refused, naming the format"),
                      succeeds(N, note="or fully supported: playable, nothing hidden left")],
                     output=out, protected=["clip.mp4"], allowed_new=["*"])
    return build


def _mount_tmpfs(folder: Path, options: str) -> Callable[[], None] | None:
    folder.mkdir()
    if os.geteuid() != 0 or not shutil.which("mount"):
        return None
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True)
    if r.returncode != 0:
        return None
    return lambda: subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def b_output_disk_full(d: Path, src: Sources) -> Built:
    _copy(src.base.path, d / "clip.mp4")
    unmount = _mount_tmpfs(d / "disk", "size=64k")
    if unmount is None:
        return Built([], [], skip="cannot mount a small tmpfs here (needs root)")
    filler = d / "disk" / "filler"
    with open(filler, "wb") as f:  # leave ~8 KB: the output's first clusters fit, the rest does not
        try:
            f.write(bytes(56 * 1024))
        except OSError:
            pass
    return Built(["clip.mp4", "-o", "disk/out.mp4", "--faces", _with_faces(d, src)],
                 [fails(r"no space|disk full|space left|write")], output="disk/out.mp4",
                 protected=["clip.mp4", "disk/filler"], cleanup=unmount)


def b_output_read_only_fs(d: Path, src: Sources) -> Built:
    _copy(src.base.path, d / "clip.mp4")
    unmount = _mount_tmpfs(d / "ro", "size=1m,ro")
    if unmount is None:
        return Built([], [], skip="cannot mount a read-only tmpfs here (needs root)")
    return Built(["clip.mp4", "-o", "ro/out.mp4", "--faces", _with_faces(d, src)],
                 [fails(r"not writable|read-only")], output="ro/out.mp4", protected=["clip.mp4"], cleanup=unmount)


def b_output_is_input_via_symlink(d: Path, src: Sources) -> Built:
    _copy(src.base.path, d / "clip.mp4")
    (d / "link.mp4").symlink_to("clip.mp4")
    return Built(["clip.mp4", "-o", "link.mp4", "--faces", _with_faces(d, src)], [fails(r"input", rc=(1, 2))],
                 output="link.mp4", protected=["clip.mp4"])


def _dump_faces_at(target: str):
    def build(d: Path, src: Sources) -> Built:
        _copy(src.base.path, d / "clip.mp4")
        faces = _with_faces(d, src)
        if target == "out.mp4":
            (d / "out.mp4").write_bytes(b"an older output that must survive a refused run")
        return Built(["clip.mp4", "-o", "out.mp4", "--faces", faces, "--dump-faces", target],
                     [fails(r"dump-faces|dump", rc=(1, 2), note="refused before anything is written")],
                     protected=["clip.mp4", "faces.jsonl"] + (["out.mp4"] if target == "out.mp4" else []))
    return build


# ---------------------------------------------------------------------- the table


def _frac(f: float) -> Callable[[int], int]:
    return lambda n: int(n * f)


CASES: list[Case] = [
    # not a video
    Case("zero_bytes", b_zero_bytes, "an empty .mp4: fails, says it is empty"),
    Case("random_bytes", b_random_bytes, "64 KiB of random bytes named .mp4: fails, not a video"),
    Case("zeros_mkv", b_zeros_mkv, "64 KiB of zero bytes named .mkv: fails, not a video"),
    Case("mp4_header_then_garbage", b_mp4_header_then_garbage, "an mp4's first 1.5 KB then garbage: fails, corrupt"),
    Case("audio_only", b_audio_only, "an .m4a with only audio: fails, no video stream"),
    Case("image_png", b_image_png, "a PNG photo: fails, an image is not a video"),
    Case("jpeg_named_mp4", b_jpeg_named_mp4, "a JPEG named .mp4: fails, an image is not a video"),
    Case("directory_as_input", b_directory, "a folder named clip.mp4: fails, not a file"),
    Case("dev_zero_as_input", b_dev_zero, "/dev/zero: fails at once, not a file (no endless read)"),
    # truncated
    Case("truncated_mp4_half", _truncated("truncated_mp4_half", lambda s: s.base.path, _frac(0.5),
                                          TRUNCATED + "|corrupt"),
         "mp4 (index at the end) cut in half: fails, truncated"),
    Case("truncated_mp4_video_index", _truncated("truncated_mp4_video_index", lambda s: s.base.path,
                                                 lambda n: _in_box(b"moov", 0, 0.5), TRUNCATED + "|corrupt"),
         "mp4 cut in the middle of its index (the video track's tables): fails, truncated"),
    Case("truncated_mp4_audio_index", _truncated("truncated_mp4_audio_index", lambda s: s.base.path,
                                                 lambda n: _in_box(b"trak", 1, 0.6), TRUNCATED + "|corrupt"),
         "mp4 cut inside its index, in the audio track's tables (video intact): fails, truncated"),
    Case("truncated_faststart_30", _truncated("truncated_faststart_30", Sources.faststart, _frac(0.3), TRUNCATED),
         "faststart mp4 cut at 30%: fails, truncated"),
    Case("truncated_faststart_80", _truncated("truncated_faststart_80", Sources.faststart, _frac(0.8), TRUNCATED),
         "faststart mp4 cut at 80%: fails, truncated"),
    Case("truncated_faststart_last_bytes", _truncated("truncated_faststart_last_bytes", Sources.faststart,
                                                      lambda n: n - 100, TRUNCATED),
         "faststart mp4 missing its last 100 bytes: fails, truncated"),
    Case("truncated_mkv_5", _truncated("truncated_mkv_5", Sources.clustered_mkv, _frac(0.05), TRUNCATED + "|corrupt"),
         "Matroska cut at 5% (headers only): fails, truncated"),
    Case("truncated_mkv_50", _truncated("truncated_mkv_50", Sources.clustered_mkv, _frac(0.5), TRUNCATED),
         "Matroska cut in half: fails, truncated"),
    Case("truncated_mkv_90", _truncated("truncated_mkv_90", Sources.clustered_mkv, _frac(0.9), TRUNCATED),
         "Matroska cut at 90%: fails, truncated"),
    # sizes and pixel formats
    Case("size_1x1", b_one_by_one, "a 1x1 video (5 frames): succeeds, 1x1, 5 frames"),
    Case("size_odd_97x73", b_odd_size, "97x73 (odd sizes): succeeds, size kept"),
    Case("pix_gray", _pix_fmt("pix_gray", "ffv1", "gray", "mkv"), "FFV1 gray: succeeds"),
    Case("pix_gbrp_x264rgb", _pix_fmt("pix_gbrp_x264rgb", "libx264rgb", "rgb24", "mkv", decoded="gbrp"),
         "H.264 RGB (decodes to planar GBR): succeeds"),
    Case("pix_bgr0_ffv1", _pix_fmt("pix_bgr0_ffv1", "ffv1", "bgr0", "mkv"), "FFV1 packed BGR0: succeeds"),
    Case("pix_nv12_raw", _pix_fmt("pix_nv12_raw", "rawvideo", "nv12", "nut"), "raw NV12 in NUT: succeeds"),
    Case("pix_yuvj422p_mjpeg", _pix_fmt("pix_yuvj422p_mjpeg", "mjpeg", "yuvj422p", "avi"), "MJPEG 4:2:2 full range"),
    Case("pix_yuva420p", _pix_fmt("pix_yuva420p", "ffv1", "yuva420p", "mkv"), "FFV1 with alpha: succeeds"),
    Case("pix_yuv410p", _pix_fmt("pix_yuv410p", "ffv1", "yuv410p", "mkv"), "FFV1 4:1:0: succeeds"),
    Case("pix_gbrp10", _pix_fmt("pix_gbrp10", "ffv1", "gbrp10le", "mkv"), "FFV1 planar RGB 10-bit: succeeds"),
    Case("pix_yuv422p10_prores", _pix_fmt("pix_yuv422p10_prores", "prores_ks", "yuv422p10le", "mov"),
         "ProRes 4:2:2 10-bit .mov: succeeds"),
    Case("pix_pal8_gif", b_gif, "an animated GIF (pal8): succeeds, 20 frames"),
    # timestamps
    Case("vfr_jumps_and_duplicate_pts", b_vfr_jumps_and_duplicate_pts,
         "VFR with a 3 s jump and repeated pts: succeeds, all frames, increasing pts, jump kept"),
    Case("pts_missing_then_present", _pts_missing(lambda i: i < 8, 8),
         "TS whose first 8 frames have no pts: succeeds, ~40 ms between all frames (no collapse)"),
    Case("pts_missing_first_12", _pts_missing(lambda i: i < 12, 12),
         "TS whose first 12 frames have no pts: succeeds, the rest keep their own pts (no A/V shift)"),
    Case("pts_missing_in_middle", _pts_missing(lambda i: 8 <= i < 14, 6),
         "TS whose frames 8-13 have no pts: succeeds, ~40 ms between all frames (no collapse)"),
    Case("mp4_cut_with_edit_list", b_mp4_cut_with_edit_list,
         "ffmpeg -ss 0.5 -c copy cut (edit list): succeeds with the frames a player shows"),
    # metadata and streams
    Case("rotation_90", b_rotation, "display matrix 90 degrees: succeeds, rotation kept"),
    Case("interlaced_tff", b_interlaced, "interlaced H.264, top field first: succeeds, field order kept"),
    Case("two_video_streams", b_two_video_streams, "two video streams: succeeds with the first one's frames"),
    Case("subtitles_mkv", b_subtitles_mkv, "SRT subtitles in .mkv: succeeds, subtitles copied"),
    Case("subtitles_into_mp4", b_subtitles_into_mp4, "SRT subtitles into .mp4: fails, suggests .mkv"),
    Case("cover_art_mp4", b_cover_art, "mp4 with cover art: succeeds, cover art kept"),
    Case("mov_timecode_into_mp4", b_mov_timecode_into_mp4, ".mov with a timecode track into .mp4: succeeds"),
    # damaged data
    Case("concealed_frames_skip", b_concealed_frames_skip,
         "a P frame FFmpeg conceals ('error while decoding MB'): succeeds, counted"),
    Case("concealed_frames_fail", b_concealed_frames_fail, "the same with --corrupt-frames fail: fails"),
    Case("mkv_damaged_middle", b_mkv_damaged_middle,
         "Matroska with a sixth zeroed in the middle: fails, or succeeds reporting the damage"),
    # playlists, protocols, URLs
    Case("hls_local_playlist", b_hls_local, ".m3u8 with a local segment: fails, playlist refused"),
    Case("hls_http_playlist", b_hls_http, ".m3u8 with an http:// segment: fails at once, playlist refused"),
    Case("hls_fifo_segment", b_hls_fifo_segment, ".m3u8 whose segment is a FIFO: fails at once (never opened)"),
    Case("ffconcat_list", b_ffconcat_list, "an ffconcat list: fails, playlist refused"),
    Case("ffconcat_named_mp4", b_ffconcat_named_mp4, "an ffconcat list named .mp4: fails, refused"),
    Case("dash_manifest", b_dash_manifest, "a DASH .mpd: fails, refused"),
    Case("concat_protocol_argument", b_concat_protocol_argument, "'concat:a.mp4|b.mp4': fails, input not found"),
    Case("file_named_concat", b_file_named_concat, "a file named 'concat:a.mp4|b.mp4': succeeds with its own frames"),
    Case("http_url_argument", b_http_url, "http://127.0.0.1:9/clip.mp4: fails at once, input not found"),
    Case("file_named_like_url", b_file_named_like_url, "a local path http://host/clip.mp4: succeeds"),
    Case("image_sequence_pattern", b_image_sequence_pattern, "'img%03d.png' with img001.png...: fails, not found"),
    Case("workers_2_long_tmpdir", b_workers_2_long_tmpdir,
         "--workers 2 with a long TMPDIR: succeeds, no worker left running"),
    # outputs
    Case("output_hls", _output_format("out.m3u8", r"m3u8|hls|playlist"),
         "-o out.m3u8: refused clearly or fully supported"),
    Case("output_dash", _output_format("out.mpd", r"mpd|dash|manifest"),
         "-o out.mpd: refused clearly or fully supported"),
    Case("output_image_sequence", _output_format("img%03d.png", r"png|image"),
         "-o img%03d.png: refused or fully supported"),
    Case("output_png", _output_format("out.png", r"png|image"), "-o out.png: refused or fully supported"),
    Case("output_disk_full", b_output_disk_full, "output on a full disk: fails, says so, nothing left"),
    Case("output_read_only_fs", b_output_read_only_fs, "output on a read-only file system: fails, not writable"),
    Case("output_is_input_via_symlink", b_output_is_input_via_symlink, "-o a symlink to the input: refused"),
    Case("dump_faces_is_input", _dump_faces_at("clip.mp4"), "--dump-faces INPUT: refused, input intact"),
    Case("dump_faces_is_output", _dump_faces_at("out.mp4"), "--dump-faces OUTPUT: refused, nothing written"),
    Case("dump_faces_is_faces_file", _dump_faces_at("faces.jsonl"), "--dump-faces = --faces file: refused"),
]

CASES_BY_NAME = {c.name: c for c in CASES}
assert len(CASES_BY_NAME) == len(CASES)
