"""Tracking faces across frames, filling detection gaps, smoothing landmarks, spotting cuts.

- ``FaceTracker`` gives each face an id that lasts while the face is visible: detections are
  assigned to tracks per frame (Hungarian, on box IoU plus landmark distance). Between
  detector runs (``--detect-every K``) and across short detector misses, a track's landmarks
  are carried by sparse optical flow inside its box; a track ends after ``max_missing``
  frames without a detection.
- ``OneEuroFilter`` smooths each track's landmarks causally (Casiez et al. 2012): a low
  cutoff at rest removes jitter, a cutoff that rises with speed keeps up with motion. Speed is
  measured in face sizes per second, so one setting suits small and large faces.
- ``SceneCutDetector`` flags the first frame of a new shot: every track ends there, so no
  state (smoothing, temporal blending) crosses a cut.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np
from scipy.optimize import linear_sum_assignment

from streamer.faces.face import Face

FLOW_MAX_SIDE = 160  # optical flow runs on the face region scaled to at most this size
SPEED_CUTOFF_HZ = 3.0  # One-Euro: low-pass on the speed estimate (1 Hz, the usual default, lags a turning head)


def box_iou(a: np.ndarray, b: np.ndarray) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


class OneEuroFilter:
    """Causal adaptive low-pass over an array of coordinates."""

    def __init__(self, min_cutoff: float, beta: float, d_cutoff: float = SPEED_CUTOFF_HZ):
        self.min_cutoff, self.beta, self.d_cutoff = min_cutoff, beta, d_cutoff
        self._x: np.ndarray | None = None
        self._dx: np.ndarray | None = None
        self._t = 0.0

    @staticmethod
    def _alpha(cutoff, dt: float):
        tau = 1.0 / (2 * math.pi * cutoff)
        return 1.0 / (1.0 + tau / dt)

    def __call__(self, x: np.ndarray, t: float, scale: float) -> np.ndarray:
        """Filter ``x`` observed at time ``t`` (seconds); ``scale`` is the face size in pixels."""
        if self._x is None:
            self._x, self._dx, self._t = x.copy(), np.zeros_like(x), t
            return x.copy()
        dt = max(t - self._t, 1e-3)
        a_d = self._alpha(self.d_cutoff, dt)
        self._dx = a_d * (x - self._x) / dt + (1 - a_d) * self._dx
        speed = np.abs(self._dx) / max(scale, 1.0)  # face sizes per second
        a = self._alpha(self.min_cutoff + self.beta * speed, dt)
        self._x = a * x + (1 - a) * self._x
        self._t = t
        return self._x.copy()


def propagate_by_flow(prev_gray: np.ndarray, gray: np.ndarray, face: Face) -> Face | None:
    """Move ``face`` from ``prev_gray`` to ``gray`` with the similarity that best explains the
    optical flow of corner points inside its box; None if the flow is unreliable."""
    h, w = gray.shape
    x0, y0, x1, y1 = face.box
    mx, my = (x1 - x0) * 0.25, (y1 - y0) * 0.25
    rx0, ry0 = int(max(0, x0 - mx)), int(max(0, y0 - my))
    rx1, ry1 = int(min(w, x1 + mx)), int(min(h, y1 + my))
    if rx1 - rx0 < 8 or ry1 - ry0 < 8:
        return None
    scale = min(1.0, FLOW_MAX_SIDE / max(rx1 - rx0, ry1 - ry0))
    size = (max(8, round((rx1 - rx0) * scale)), max(8, round((ry1 - ry0) * scale)))
    a = cv2.resize(prev_gray[ry0:ry1, rx0:rx1], size, interpolation=cv2.INTER_AREA)
    b = cv2.resize(gray[ry0:ry1, rx0:rx1], size, interpolation=cv2.INTER_AREA)
    pts = cv2.goodFeaturesToTrack(a, maxCorners=60, qualityLevel=0.01, minDistance=3)
    if pts is None or len(pts) < 6:
        return None
    moved, status, _ = cv2.calcOpticalFlowPyrLK(a, b, pts, None, winSize=(15, 15), maxLevel=2)
    ok = status.reshape(-1) == 1
    if ok.sum() < 6:
        return None
    m, inliers = cv2.estimateAffinePartial2D(pts[ok], moved[ok], method=cv2.RANSAC, ransacReprojThreshold=1.5)
    if m is None or inliers is None or inliers.sum() < 5:
        return None
    # m acts on the scaled region; express it in frame pixels.
    to_region = np.array([[scale, 0, -rx0 * scale], [0, scale, -ry0 * scale], [0, 0, 1]])
    full = np.linalg.inv(to_region) @ np.vstack([m, [0, 0, 1]]) @ to_region
    lm = face.landmarks @ full[:2, :2].T + full[:2, 2]
    corners = np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]]) @ full[:2, :2].T + full[:2, 2]
    box = np.concatenate([corners.min(axis=0), corners.max(axis=0)])
    return Face(lm, box, face.score, face.track, interpolated=True)


@dataclass
class _Track:
    id: int
    raw: Face  # last observed (or flow-carried) face, unsmoothed
    smoother: OneEuroFilter | None
    missing: int = 0


class FaceTracker:
    """Per frame: ``update(t, detections, gray)`` -> faces with track ids.

    ``detections`` is the detector's (or the faces file's) output for this frame, or None on
    frames the detector skipped. ``gray`` (a uint8 luma plane) enables optical-flow carrying.
    ``fill_gaps``: show flow-carried faces for tracks the detector missed (detector input);
    with a faces file, frames without a face really have none.
    """

    def __init__(self, *, iou_min: float = 0.3, max_missing: int = 5, fill_gaps: bool = True,
                 smooth: bool = True, min_cutoff: float = 0.5, beta: float = 6.0):
        self.iou_min, self.max_missing, self.fill_gaps = iou_min, max_missing, fill_gaps
        self.smooth, self.min_cutoff, self.beta = smooth, min_cutoff, beta
        self._tracks: list[_Track] = []
        self._next_id = 0
        self._prev_gray: np.ndarray | None = None
        self._ended: list[int] = []

    def take_ended(self) -> list[int]:
        """Ids of tracks that ended since the last call (their worker state can go)."""
        ended, self._ended = self._ended, []
        return ended

    def reset(self) -> None:
        """A scene cut: every track ends."""
        self._ended.extend(t.id for t in self._tracks)
        self._tracks = []
        self._prev_gray = None

    def update(self, t: float, detections: list[Face] | None, gray: np.ndarray | None = None) -> list[Face]:
        """Faces with track ids for the frame at time ``t`` (seconds)."""
        carried: dict[int, Face] = {}
        if gray is not None and self._prev_gray is not None and self._prev_gray.shape == gray.shape:
            for track in self._tracks:
                moved = propagate_by_flow(self._prev_gray, gray, track.raw)
                if moved is not None:
                    carried[track.id] = moved
        # A copy: the frame's planes are pasted into later, by another thread.
        self._prev_gray = None if gray is None else gray.copy()

        if detections is None:  # not a detector frame: show the tracks the flow could carry
            visible = []
            for track in self._tracks:
                if track.id in carried:
                    track.raw = carried[track.id]
                    visible.append(track)
        else:
            visible = self._assign(detections, carried)
        return [self._show(track, t) for track in visible]

    def _assign(self, detections: list[Face], carried: dict[int, Face]) -> list[_Track]:
        tracks = self._tracks
        predicted = [carried.get(tr.id, tr.raw) for tr in tracks]
        matched_tracks, matched_dets = set(), set()
        if tracks and detections:
            cost = np.ones((len(tracks), len(detections)))
            for i, p in enumerate(predicted):
                for j, d in enumerate(detections):
                    iou = box_iou(p.box, d.box)
                    if iou >= self.iou_min:
                        spread = np.linalg.norm(p.landmarks - d.landmarks, axis=1).mean() / max(p.size, 1.0)
                        cost[i, j] = (1 - iou) + spread
                    else:
                        cost[i, j] = 1e6
            rows, cols = linear_sum_assignment(cost)
            for i, j in zip(rows, cols):
                if cost[i, j] < 1e6:
                    tracks[i].raw, tracks[i].missing = detections[j], 0
                    matched_tracks.add(i)
                    matched_dets.add(j)
        visible = [tracks[i] for i in sorted(matched_tracks)]
        survivors = list(visible)
        for i, track in enumerate(tracks):
            if i in matched_tracks:
                continue
            track.missing += 1
            if track.missing > self.max_missing:
                self._ended.append(track.id)
                continue
            survivors.append(track)
            if self.fill_gaps and track.id in carried:
                track.raw = carried[track.id]
                visible.append(track)
        for j, det in enumerate(detections):
            if j not in matched_dets:
                smoother = OneEuroFilter(self.min_cutoff, self.beta, SPEED_CUTOFF_HZ) if self.smooth else None
                track = _Track(self._next_id, det, smoother)
                self._next_id += 1
                survivors.append(track)
                visible.append(track)
        self._tracks = survivors
        return visible

    def _show(self, track: _Track, t: float) -> Face:
        raw = track.raw
        lm, box = raw.landmarks, raw.box
        if track.smoother is not None:
            state = track.smoother(np.concatenate([lm.reshape(-1), box]), t, raw.size)
            lm, box = state[:10].reshape(5, 2), state[10:]
        return Face(lm, box, raw.score, track.id, raw.interpolated)


class SceneCutDetector:
    """A cut is a large mean change between consecutive 64x36 luma thumbnails."""

    def __init__(self, threshold: float = 0.35):
        self.threshold = threshold
        self._prev: np.ndarray | None = None

    def __call__(self, gray: np.ndarray) -> bool:
        thumb = cv2.resize(gray, (64, 36), interpolation=cv2.INTER_AREA).astype(np.float32) / 255.0
        prev, self._prev = self._prev, thumb
        return prev is not None and float(np.abs(thumb - prev).mean()) > self.threshold
