"""Synthetic clips with ground truth, for tests and benchmarks (needs scikit-image, a test
dependency, for its ``astronaut`` photograph).

A clip is the astronaut photo moved by a known similarity per frame, so every frame's clean
image and its five landmarks are known exactly. Options add per-frame degradations (noise,
blur, JPEG, each drawn independently per frame), landmark jitter in the ``--faces`` file, a
hand-like occluder, a scene cut to a different shot, an audio track, odd sizes, 10-bit pixels,
rotation metadata and variable frame rate.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import cv2
import numpy as np

from streamer.faces.face import box_from_landmarks

# Five landmarks of the astronaut's face in skimage.data.astronaut() (512x512), marked by hand:
# left eye, right eye, nose tip, left and right mouth corners (image left/right).
ASTRONAUT_LANDMARKS = np.array([[205.0, 101.0], [246.0, 104.0], [224.0, 127.0], [204.0, 141.0], [244.0, 142.0]])
MOTIONS = ("static", "slow", "fast")


def astronaut() -> np.ndarray:
    from skimage import data

    return data.astronaut()


@dataclass
class Clip:
    path: Path
    faces_path: Path
    width: int
    height: int
    fps: Fraction
    pts: list[int]
    time_base: Fraction
    clean: list[np.ndarray]  # ground-truth frames (displayed orientation, RGB uint8)
    landmarks: list[np.ndarray]  # true landmarks per frame (displayed coordinates)
    cut_at: int | None = None
    audio_packets: int = 0

    @property
    def frames(self) -> int:
        return len(self.clean)

    def face_box(self, index: int, grow: float = 0.6) -> tuple[int, int, int, int]:
        """The face region used for measurements: the landmarks' bounds grown by ``grow``."""
        x0, y0, x1, y1 = box_from_landmarks(self.landmarks[index], grow=grow)
        return (max(0, int(x0)), max(0, int(y0)), min(self.width, int(np.ceil(x1))), min(self.height, int(np.ceil(y1))))


def _similarity(scale: float, angle_deg: float, center_src: np.ndarray, center_dst: np.ndarray) -> np.ndarray:
    a = np.deg2rad(angle_deg)
    r = scale * np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    m = np.zeros((2, 3))
    m[:, :2] = r
    m[:, 2] = center_dst - r @ center_src
    return m


def _motion(kind: str, t: int, width: int, height: int, face_px: float) -> tuple[float, float, np.ndarray]:
    """(scale factor, angle, face centre) at frame t."""
    centre = np.array([width / 2, height / 2])
    if kind == "static":
        return 1.0, 0.0, centre
    if kind == "slow":  # ~0.6 px per frame drift, a slow nod
        return 1.0 + 0.02 * np.sin(t / 15), 2.0 * np.sin(t / 12), centre + np.array([0.6 * t - 8, 3 * np.sin(t / 10)])
    if kind == "fast":  # ~6 px per frame, quick turns
        return (1.0 + 0.08 * np.sin(t / 3), 10.0 * np.sin(t / 2.5),
                centre + np.array([face_px * 0.35 * np.sin(t / 2.0), face_px * 0.2 * np.cos(t / 2.7)]))
    raise ValueError(f"motion must be one of {MOTIONS}")


def _degrade(img: np.ndarray, rng: np.random.Generator, noise: float, blur: float, jpeg: int | None) -> np.ndarray:
    out = img.astype(np.float32)
    if blur > 0:
        out = cv2.GaussianBlur(out, (0, 0), blur * rng.uniform(0.6, 1.4))
    if noise > 0:
        out += rng.normal(0, noise, out.shape).astype(np.float32)
    out = np.clip(out + 0.5, 0, 255).astype(np.uint8)
    if jpeg:
        q = int(np.clip(jpeg + rng.integers(-10, 11), 5, 95))
        ok, buf = cv2.imencode(".jpg", out[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, q])
        out = cv2.imdecode(buf, cv2.IMREAD_COLOR)[:, :, ::-1]
    return out


def _occluder(img: np.ndarray, t: int, frames: int, landmarks: np.ndarray) -> np.ndarray:
    """A skin-coloured hand-like blob sweeping across the face over the clip."""
    out = img.copy()
    span = np.linalg.norm(landmarks[1] - landmarks[0]) * 2.2
    progress = t / max(1, frames - 1)
    cx = landmarks[:, 0].mean() - 1.5 * span + 3 * span * progress
    cy = landmarks[:, 1].mean() + 0.2 * span
    cv2.ellipse(out, (int(cx), int(cy)), (int(span * 0.45), int(span * 0.7)), 20, 0, 360, (214, 160, 128), -1)
    for k in range(4):  # fingers
        fx = int(cx - span * 0.3 + k * span * 0.2)
        cv2.ellipse(out, (fx, int(cy - span * 0.75)), (int(span * 0.08), int(span * 0.3)), 0, 0, 360,
                    (208, 154, 122), -1)
    return out


def make_clip(path: str | Path, *, frames: int = 12, width: int = 320, height: int = 240, fps: int = 25,
              motion: str = "slow", face_px: float = 90.0, noise: float = 0.0, blur: float = 0.0,
              jpeg: int | None = None, jitter_px: float = 0.0, occluder: bool = False, cut_at: int | None = None,
              audio: bool = True, rotation: int = 0, pix_fmt: str | None = None, codec: str = "libx264",
              crf: int = 0, vfr: bool = False, subtitles: bool = False, audio_extra_s: float = 0.0,
              seed: int = 0) -> Clip:
    """Write a clip and its ``--faces`` file (``<path>.faces.jsonl``); return its ground truth.

    ``face_px`` is the eye-to-mouth height scale: the face is sized so the distance between
    the eyes is ``face_px * 0.45``. Frames are generated upright (displayed orientation); with
    ``rotation`` they are stored rotated back and the stream carries the display matrix.
    """
    path = Path(path)
    rng = np.random.default_rng(seed)
    src = astronaut()
    second = cv2.cvtColor(np.ascontiguousarray(src[:, ::-1]), cv2.COLOR_RGB2HSV)  # the "other shot": mirrored, recoloured
    second[:, :, 0] = (second[:, :, 0].astype(int) + 20) % 180
    second = cv2.cvtColor(second, cv2.COLOR_HSV2RGB)
    second_lm = ASTRONAUT_LANDMARKS.copy()
    second_lm[:, 0] = 511 - second_lm[:, 0]
    second_lm = second_lm[[1, 0, 2, 4, 3]]  # mirroring swaps left and right
    eye_dist = np.linalg.norm(ASTRONAUT_LANDMARKS[1] - ASTRONAUT_LANDMARKS[0])
    base_scale = face_px * 0.45 / eye_dist
    face_centre = ASTRONAUT_LANDMARKS.mean(axis=0)

    clean, marks = [], []
    for t in range(frames):
        in_second = cut_at is not None and t >= cut_at
        image, lm_src = (second, second_lm) if in_second else (src, ASTRONAUT_LANDMARKS)
        scale, angle, centre = _motion(motion, t - (cut_at if in_second else 0), width, height, face_px)
        if in_second:
            centre = centre + np.array([width * 0.12, -height * 0.05])
        m = _similarity(base_scale * scale, angle, face_centre, centre)
        frame = cv2.warpAffine(image, m, (width, height), flags=cv2.INTER_LANCZOS4, borderMode=cv2.BORDER_REFLECT_101)
        lm = lm_src @ m[:, :2].T + m[:, 2]
        if occluder:
            frame = _occluder(frame, t, frames, lm)
        clean.append(frame)
        marks.append(lm)

    degraded = [_degrade(f, rng, noise, blur, jpeg) for f in clean]
    time_base = Fraction(1, fps * 512)
    step = 512
    if vfr:
        gaps = rng.choice([1, 1, 1, 2], size=frames)  # some frames held for two intervals
        pts = [int(x) for x in np.concatenate([[0], np.cumsum(gaps[:-1])]) * step]
    else:
        pts = [t * step for t in range(frames)]
    steps = (rotation // 90) % 4
    if pix_fmt is None:
        pix_fmt = "yuv444p" if width % 2 or height % 2 else "yuv420p"
    audio_packets = _write_video(path, degraded, pts, time_base, Fraction(fps), codec, crf, pix_fmt, steps, rotation,
                                 audio, subtitles, audio_extra_s)

    faces_path = path.with_name(path.name + ".faces.jsonl")
    with open(faces_path, "w") as f:
        for t, lm in enumerate(marks):
            noisy = lm + rng.normal(0, jitter_px, lm.shape) if jitter_px else lm
            box = box_from_landmarks(noisy, grow=0.8)
            f.write(json.dumps({"frame": t, "faces": [{"landmarks": np.round(noisy, 3).tolist(),
                                                       "box": np.round(box, 2).tolist(), "score": 0.99}]}) + "\n")
    return Clip(path, faces_path, width, height, Fraction(fps), pts, time_base, clean, marks, cut_at, audio_packets)


def _write_video(path: Path, frames: list[np.ndarray], pts: list[int], time_base: Fraction, rate: Fraction,
                 codec: str, crf: int, pix_fmt: str, steps: int, rotation: int, audio: bool, subtitles: bool,
                 audio_extra_s: float = 0.0) -> int:
    coded = [np.ascontiguousarray(np.rot90(f, -steps)) for f in frames] if steps else frames
    h, w = coded[0].shape[:2]
    with av.open(str(path), "w") as out:
        v = out.add_stream(codec, rate=rate, options={"crf": str(crf)} if codec.startswith("libx26") else {})
        v.width, v.height, v.pix_fmt = w, h, pix_fmt
        v.time_base = time_base
        v.codec_context.time_base = time_base
        if rotation:
            v.set_display_rotation(rotation)
        a = None
        if audio:
            a = out.add_stream("aac", rate=48000)
            a.layout = "mono"
        duration_s = (pts[-1] + 512) * float(time_base) + audio_extra_s
        n_audio = 0
        if subtitles:  # copied from a tiny .srt, the way the pipeline copies streams
            srt = path.with_name(path.name + ".srt")
            srt.write_text("1\n00:00:00,000 --> 00:00:00,300\nHello\n\n2\n00:00:00,300 --> 00:00:00,600\nWorld\n")
            with av.open(str(srt)) as sub_in:
                s = out.add_stream_from_template(sub_in.streams[0])
                for packet in sub_in.demux():
                    if packet.size:
                        packet.stream = s
                        out.mux(packet)
            srt.unlink()
        for img, p in zip(coded, pts):
            frame = av.VideoFrame.from_ndarray(img, format="rgb24").reformat(format=pix_fmt)
            frame.pts, frame.time_base = p, time_base
            for packet in v.encode(frame):
                out.mux(packet)
        for packet in v.encode(None):
            out.mux(packet)
        if a is not None:
            samples = int(duration_s * 48000)
            tone = (0.2 * np.sin(2 * np.pi * 440 * np.arange(samples) / 48000)).astype(np.float32)
            for start in range(0, samples, 1024):
                chunk = tone[start:start + 1024]
                af = av.AudioFrame.from_ndarray(chunk[None, :], format="fltp", layout="mono")
                af.sample_rate, af.pts, af.time_base = 48000, start, Fraction(1, 48000)
                for packet in a.encode(af):
                    out.mux(packet)
                    n_audio += 1
            for packet in a.encode(None):
                out.mux(packet)
                n_audio += 1
    return n_audio


# ---------------------------------------------------------------------- reading and measuring


def read_frames(path: str | Path, *, display: bool = True) -> tuple[list[np.ndarray], list[int], Fraction, int]:
    """Decoded RGB frames (upright if ``display``), their pts, the time base and the rotation."""
    with av.open(str(path)) as c:
        v = c.streams.video[0]
        frames, pts, rotation = [], [], 0
        for f in c.decode(v):
            rotation = int(round(f.rotation or 0))
            img = f.to_ndarray(format="rgb24")
            frames.append(np.ascontiguousarray(np.rot90(img, (rotation // 90) % 4)) if display and rotation else img)
            pts.append(f.pts)
        return frames, pts, v.time_base, rotation


def read_packets(path: str | Path, kind: str) -> list[tuple[int | None, int | None, bytes]]:
    """(pts, dts, payload) of every packet of the streams of type ``kind``."""
    with av.open(str(path)) as c:
        streams = [s for s in c.streams if s.type == kind]
        if not streams:
            return []
        return [(p.pts, p.dts, bytes(p)) for p in c.demux(*streams) if p.size]


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def face_psnr(outputs: list[np.ndarray], truth: list[np.ndarray], clip: Clip) -> float:
    """PSNR over the face regions of all frames together."""
    err, n = 0.0, 0
    for t, (o, g) in enumerate(zip(outputs, truth)):
        x0, y0, x1, y1 = clip.face_box(t)
        d = o[y0:y1, x0:x1].astype(np.float64) - g[y0:y1, x0:x1].astype(np.float64)
        err += float((d**2).sum())
        n += d.size
    return 10 * np.log10(255.0**2 / (err / n)) if err else float("inf")


def temporal_error(outputs: list[np.ndarray], truth: list[np.ndarray], clip: Clip, skip: set[int] = frozenset()) -> float:
    """Mean over frames and face pixels of |(out_t - out_t-1) - (gt_t - gt_t-1)| (0..255)."""
    total, n = 0.0, 0
    for t in range(1, len(outputs)):
        if t in skip:
            continue
        x0, y0, x1, y1 = clip.face_box(t)
        do = outputs[t][y0:y1, x0:x1].astype(np.float64) - outputs[t - 1][y0:y1, x0:x1]
        dg = truth[t][y0:y1, x0:x1].astype(np.float64) - truth[t - 1][y0:y1, x0:x1]
        total += float(np.abs(do - dg).sum())
        n += do.size
    return total / n if n else 0.0
