"""Synthetic clips with ground truth, for tests and benchmarks (needs scikit-image, a test
dependency, for its ``astronaut`` photograph).

A clip is the astronaut photo moved by a known similarity per frame, so every frame's clean
image and its five landmarks are known exactly. Options add per-frame degradations (noise,
blur, JPEG, each drawn independently per frame), landmark jitter in the ``--faces`` file, a
hand-like occluder, a scene cut to a different shot, an audio track, odd sizes, 10-bit pixels,
rotation metadata and variable frame rate.

Tracking clips (``make_tracking_clip``) put heads in front of a still photograph: the
astronaut's head mapped on an ellipsoid, so it can turn like a real head (features sliding
and foreshortening inside a fixed outline), rest, and enter or leave the frame.
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
    heads: list[np.ndarray] | None = None  # tracking clips: each head's landmarks, (frames, 5, 2), in view or not

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



# The temporal-stability clips (bench/temporal.py, and the tests that compare blenders on them):
# how each moves, and how each is degraded before restoration.
TEMPORAL_CLIPS = {
    "static": dict(motion="static"),
    "slow": dict(motion="slow"),
    "fast": dict(motion="fast"),
    "cut": dict(motion="slow", cut_at=0.5),
    "occluder": dict(motion="slow", occluder=True),
}
TEMPORAL_DEGRADE = dict(noise=6.0, blur=0.8, jpeg=45, jitter_px=1.5)

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


# ---------------------------------------------------------------------- tracking clips

HEAD_CENTRE, HEAD_AXES = np.array([227.0, 102.0]), (75.0, 82.0)  # the astronaut's head, hair included (photo px)
HEAD_FEATHER_PX = 3.0  # soft edge of the head's outline (photo px)
FACE_BOX_GROW = 1.2  # box_from_landmarks growth giving a RetinaFace-like face box (~2.2 eye distances wide)
TURN_YAW_DEG = 40.0  # "turn": the head turns from this far one way to as far the other...
TURN_FRAMES = 8  # ... in this many frames (a raised cosine: up to 16 degrees a frame), then holds as long
TURN_SHIFT = 0.6  # turning, the face moves sideways (the head pivots on the neck): this * face_px * sin(yaw)
TURN_ROLL_DEG = 8.0  # ... tilts up to this towards the side it turns to
TURN_SCALE = 0.08  # ... and comes closer by up to this mid-turn
SLIDE_FRAMES = 6  # a head entering or leaving crosses into or out of the frame in this many frames
HEAD_MOTIONS = ("static", "turn")


@dataclass
class Head:
    """One head of a tracking clip: the astronaut's head mapped on an ellipsoid, so that it
    turns like a real head: its features slide sideways and foreshorten while its outline
    stays, which a rigid flow model cannot follow."""

    motion: str = "turn"  # "static"; "turn": turns side to side (yaw, shift, roll, scale), holding in between
    anchor: tuple[float, float] = (0.5, 0.5)  # resting centre of the face, as fractions of the frame size
    face_px: float = 160.0  # as in make_clip: eye distance 0.45 * face_px
    start: int = 0  # the first turn starts at this frame (still before it)
    enter: int | None = None  # slides in from beyond the left edge, arriving at this frame
    leave: int | None = None  # slides out beyond the right edge from this frame


def _yaw_landmarks(points: np.ndarray, yaw: float) -> np.ndarray:
    """Photo points on the head ellipsoid (vertical axis through HEAD_CENTRE) turned by ``yaw``
    radians, orthographic view: x = r sin(phi) -> r sin(phi + yaw), r the head's radius at that height."""
    d = points - HEAD_CENTRE
    r = HEAD_AXES[0] * np.sqrt(np.clip(1 - (d[:, 1] / HEAD_AXES[1]) ** 2, 1e-6, 1))
    phi = np.arcsin(np.clip(d[:, 0] / r, -1, 1))
    return np.stack([HEAD_CENTRE[0] + r * np.sin(phi + yaw), points[:, 1]], axis=1)


def _unyaw(x: np.ndarray, y: np.ndarray, yaw: float) -> np.ndarray:
    """Where in the photo a point of the turned head's image comes from (the inverse of
    ``_yaw_landmarks``); beyond the photo's side of the head, its edge is stretched."""
    dy = y - HEAD_CENTRE[1]
    r = HEAD_AXES[0] * np.sqrt(np.clip(1 - (dy / HEAD_AXES[1]) ** 2, 1e-6, 1))
    phi = np.clip(np.arcsin(np.clip((x - HEAD_CENTRE[0]) / r, -1, 1)) - yaw, -np.pi / 2, np.pi / 2)
    return HEAD_CENTRE[0] + r * np.sin(phi)


def _turn_profile(u: int) -> float:
    """-1 (turned one way) .. 1 (the other) at frame u of a "turn": turns of TURN_FRAMES
    frames (raised cosine) between holds of TURN_FRAMES frames, starting at u = 0."""
    phase = max(u, 0) % (4 * TURN_FRAMES)
    if phase < TURN_FRAMES:
        return -np.cos(np.pi * phase / TURN_FRAMES)
    if phase < 2 * TURN_FRAMES:
        return 1.0
    if phase < 3 * TURN_FRAMES:
        return np.cos(np.pi * (phase - 2 * TURN_FRAMES) / TURN_FRAMES)
    return -1.0


def _head_pose(head: Head, t: int, width: int, height: int, base_scale: float) -> tuple[float, float, np.ndarray, float]:
    """(scale factor, roll in degrees, face centre, yaw in radians) of ``head`` at frame t."""
    if head.motion not in HEAD_MOTIONS:
        raise ValueError(f"head motion must be one of {HEAD_MOTIONS}")
    centre = np.array([head.anchor[0] * width, head.anchor[1] * height])
    scale, roll, yaw = 1.0, 0.0, 0.0
    if head.motion == "turn":
        turned = _turn_profile(t - head.start)
        yaw = np.deg2rad(TURN_YAW_DEG) * turned
        centre[0] += TURN_SHIFT * head.face_px * np.sin(yaw)
        roll, scale = TURN_ROLL_DEG * turned, 1.0 + TURN_SCALE * (1 - turned**2)
    reach = HEAD_AXES[0] * base_scale * 1.2  # far enough for the whole head to be outside
    if head.enter is not None and t < head.enter:
        centre[0] -= (centre[0] + reach) * min(1.0, (head.enter - t) / SLIDE_FRAMES)
    if head.leave is not None and t > head.leave:
        centre[0] += (width - centre[0] + reach) * min(1.0, (t - head.leave) / SLIDE_FRAMES)
    return scale, roll, centre, yaw


def _draw_head(frame: np.ndarray, photo: np.ndarray, m: np.ndarray, yaw: float) -> None:
    """Paint the head (photo -> frame by the similarity ``m``, turned by ``yaw``) onto ``frame``."""
    h, w = frame.shape[:2]
    (ax, ay), (cx, cy) = HEAD_AXES, HEAD_CENTRE
    corners = np.array([[cx - ax, cy - ay], [cx + ax, cy - ay], [cx + ax, cy + ay], [cx - ax, cy + ay]])
    spread = corners @ m[:, :2].T + m[:, 2]
    x0, y0 = np.maximum(np.floor(spread.min(axis=0)).astype(int) - 1, 0)
    x1, y1 = np.minimum(np.ceil(spread.max(axis=0)).astype(int) + 2, (w, h))
    if x1 <= x0 or y1 <= y0:
        return
    ys, xs = np.mgrid[y0:y1, x0:x1].astype(np.float64)
    inv = cv2.invertAffineTransform(m)
    px, py = inv[0, 0] * xs + inv[0, 1] * ys + inv[0, 2], inv[1, 0] * xs + inv[1, 1] * ys + inv[1, 2]
    # The outline of a head turning about its vertical axis does not change: alpha from the ellipse.
    radius = np.sqrt(((px - cx) / ax) ** 2 + ((py - cy) / ay) ** 2)
    alpha = np.clip((1 - radius) * min(ax, ay) / HEAD_FEATHER_PX, 0, 1)[:, :, None]
    texture = cv2.remap(photo, _unyaw(px, py, yaw).astype(np.float32), py.astype(np.float32), cv2.INTER_LINEAR,
                        borderMode=cv2.BORDER_REFLECT_101).astype(np.float64)
    roi = frame[y0:y1, x0:x1].astype(np.float64)
    frame[y0:y1, x0:x1] = np.clip(texture * alpha + roi * (1 - alpha) + 0.5, 0, 255).astype(np.uint8)


def visible_fraction(box: np.ndarray, x0: float, y0: float, x1: float, y1: float) -> float:
    """The share of ``box``'s area inside the rectangle (x0, y0, x1, y1)."""
    ix = max(0.0, min(box[2], x1) - max(box[0], x0))
    iy = max(0.0, min(box[3], y1) - max(box[1], y0))
    area = (box[2] - box[0]) * (box[3] - box[1])
    return ix * iy / area if area > 0 else 0.0


def make_tracking_clip(path: str | Path, heads: list[Head], *, frames: int = 30, width: int = 320,
                       height: int = 240, fps: int = 25, noise: float = 0.0, codec: str = "libx264", crf: int = 0,
                       seed: int = 0) -> Clip:
    """Write a clip of ``heads`` in front of a still photograph (the rocket launch pad, whose
    towers give optical flow corners that do not move with the face) and its ``--faces`` file
    (faces at least half in the frame); return its ground truth: ``heads`` holds every head's
    landmarks per frame, ``landmarks`` the first head's."""
    from skimage import data

    path = Path(path)
    rng = np.random.default_rng(seed)
    photo = astronaut()
    background = cv2.resize(data.rocket(), (width, height), interpolation=cv2.INTER_AREA)
    eye_dist = np.linalg.norm(ASTRONAUT_LANDMARKS[1] - ASTRONAUT_LANDMARKS[0])
    face_centre = ASTRONAUT_LANDMARKS.mean(axis=0)
    clean, tracks = [], [np.zeros((frames, 5, 2)) for _ in heads]
    for t in range(frames):
        frame = background.copy()
        for head, track in zip(heads, tracks):
            base_scale = head.face_px * 0.45 / eye_dist
            scale, roll, centre, yaw = _head_pose(head, t, width, height, base_scale)
            m = _similarity(base_scale * scale, roll, face_centre, centre)
            _draw_head(frame, photo, m, yaw)
            track[t] = _yaw_landmarks(ASTRONAUT_LANDMARKS, yaw) @ m[:, :2].T + m[:, 2]
        clean.append(frame)

    degraded = [_degrade(f, rng, noise, 0.0, None) for f in clean]
    time_base = Fraction(1, fps * 512)
    pts = [t * 512 for t in range(frames)]
    pix_fmt = "yuv444p" if width % 2 or height % 2 else "yuv420p"
    _write_video(path, degraded, pts, time_base, Fraction(fps), codec, crf, pix_fmt, 0, 0, False, False)

    faces_path = path.with_name(path.name + ".faces.jsonl")
    with open(faces_path, "w") as f:
        for t in range(frames):
            faces = []
            for track in tracks:
                box = box_from_landmarks(track[t], grow=FACE_BOX_GROW)
                if visible_fraction(box, 0, 0, width, height) >= 0.5:
                    faces.append({"landmarks": np.round(track[t], 3).tolist(), "box": np.round(box, 2).tolist(),
                                  "score": 0.99})
            f.write(json.dumps({"frame": t, "faces": faces}) + "\n")
    return Clip(path, faces_path, width, height, Fraction(fps), pts, time_base, clean, [lm for lm in tracks[0]],
                heads=tracks)


def landmark_error(landmarks: np.ndarray, truth: np.ndarray) -> float:
    """Mean distance of the five landmarks from the truth, in units of the true eye distance."""
    return float(np.linalg.norm(landmarks - truth, axis=1).mean() / np.linalg.norm(truth[1] - truth[0]))


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
