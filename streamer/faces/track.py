"""Tracking faces across frames, filling detection gaps, smoothing landmarks, spotting cuts.

- ``FaceTracker`` gives each face an id that lasts while the face is visible: detections are
  assigned to tracks per frame (Hungarian, on box IoU plus landmark distance). It also says
  when the whole frame must be searched (``detection_due``): every ``detect_every`` frames,
  after a scene cut, and at once when it lost a face. In between, each tracked face is found
  again by the detector in the region around its predicted box (``search``), so its landmarks
  are measured, not carried: optical flow lags a turning head (the face is not a flat picture
  moving rigidly). Sparse optical flow inside the box predicts where to search and carries a
  face the search could not find; a flow estimate that most of the region's points disagree
  with is not used. A track ends after ``max_missing`` searches in a row that missed it. New
  faces are only taken from full-frame detections.
- ``OneEuroFilter`` smooths each track's landmarks causally (Casiez et al. 2012): a low
  cutoff at rest removes jitter, a cutoff that rises with speed keeps up with motion. Speed is
  that of the face's centre (the mean of its points), in face sizes per second: one setting
  suits small and large faces, and averaged over the points, measurement noise barely raises
  it at rest, so the cutoff can rise steeply with real motion without letting jitter through.
- ``SceneCutDetector`` flags the first frame of a new shot: every track ends there, so no
  state (smoothing, temporal blending) crosses a cut.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass

import cv2
import numpy as np
from scipy.optimize import linear_sum_assignment

from streamer.faces.face import Face

FLOW_MAX_SIDE = 160  # optical flow runs on the face region scaled to at most this size
FLOW_FB_MAX_PX = 1.0  # a point whose backward flow misses its start by more (scaled pixels) is not trusted
FLOW_MIN_AGREEMENT = 0.3  # share of the region's corners the similarity must explain, else the flow is unreliable
REGION_MARGIN = 0.5  # between full detections a face is searched for in its predicted box grown by this on each side
REGION_RETRY_MARGIN = 1.5  # ... and, when not found there, at once in a region 4x its box (a jump, a bad prediction)
RETRY_SIZE_RATIO = 1.5  # there, the nearest face whose size is within this factor of the track's is taken
DUPLICATE_IOU = 0.5  # two tracks whose searches found the same face: the one it matches worse loses it
SPEED_CUTOFF_HZ = 6.0  # One-Euro: low-pass on the speed estimate (1 Hz, the usual default, lags a turning head;
#                        measured landmarks on a fast turn: 3 Hz lags 0.1-0.25 eye distances at the start of a move)


def box_iou(a: np.ndarray, b: np.ndarray) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


class OneEuroFilter:
    """Causal adaptive low-pass over a set of points (an (N, 2) array): one cutoff for all of
    them, from the speed of their centre."""

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
        """Filter the points ``x`` observed at time ``t`` (seconds); ``scale`` is the face size in pixels."""
        if self._x is None:
            self._x, self._dx, self._t = x.copy(), np.zeros_like(x), t
            return x.copy()
        dt = max(t - self._t, 1e-3)
        a_d = self._alpha(self.d_cutoff, dt)
        self._dx = a_d * (x - self._x) / dt + (1 - a_d) * self._dx
        speed = np.linalg.norm(self._dx.mean(axis=0)) / max(scale, 1.0)  # of the centre, in face sizes per second
        a = self._alpha(self.min_cutoff + self.beta * speed, dt)
        self._x = a * x + (1 - a) * self._x
        self._t = t
        return self._x.copy()


def propagate_by_flow(prev_gray: np.ndarray, gray: np.ndarray, face: Face) -> Face | None:
    """Move ``face`` from ``prev_gray`` to ``gray`` with the similarity that best explains the
    optical flow of corner points inside its box; None if the flow is unreliable: fewer than
    ``FLOW_MIN_AGREEMENT`` of the corners flow back to where they started (forward-backward
    check) and fit the similarity."""
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
    back, back_status, _ = cv2.calcOpticalFlowPyrLK(b, a, moved, None, winSize=(15, 15), maxLevel=2)
    fb_error = np.linalg.norm(back - pts, axis=-1).reshape(-1)
    ok = (status.reshape(-1) == 1) & (back_status.reshape(-1) == 1) & (fb_error < FLOW_FB_MAX_PX)
    if ok.sum() < 6:
        return None
    m, inliers = cv2.estimateAffinePartial2D(pts[ok], moved[ok], method=cv2.RANSAC, ransacReprojThreshold=1.5)
    if m is None or inliers is None or inliers.sum() < max(5, FLOW_MIN_AGREEMENT * len(pts)):
        return None
    # m acts on the scaled region; express it in frame pixels.
    to_region = np.array([[scale, 0, -rx0 * scale], [0, scale, -ry0 * scale], [0, 0, 1]])
    full = np.linalg.inv(to_region) @ np.vstack([m, [0, 0, 1]]) @ to_region
    lm = face.landmarks @ full[:2, :2].T + full[:2, 2]
    corners = np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]]) @ full[:2, :2].T + full[:2, 2]
    box = np.concatenate([corners.min(axis=0), corners.max(axis=0)])
    return Face(lm, box, face.score, face.track, interpolated=True)


def _offset(predicted: Face, face: Face) -> float:
    """Distance between the landmark centres of ``face`` and ``predicted``, in ``predicted``'s sizes."""
    return float(np.linalg.norm(face.landmarks.mean(axis=0) - predicted.landmarks.mean(axis=0))) / max(predicted.size, 1.0)


# search(face, margin): the faces the detector finds in the current frame in the region around
# face.box grown by margin (of its size) on each side, in coded-frame pixels.
RegionSearch = Callable[[Face, float], list[Face]]


@dataclass
class _Track:
    id: int
    raw: Face  # last observed (or flow-carried) face, unsmoothed
    smoother: OneEuroFilter | None
    missing: int = 0


class FaceTracker:
    """Per frame: ``update(t, detections, gray, search)`` -> faces with track ids.

    ``detections`` is the detector's (or the faces file's) output for this frame, or None on
    frames without a full-frame detection; ``detection_due`` says which frames need one.
    ``gray`` (a uint8 luma plane) enables optical-flow prediction and carrying; ``search``
    (a ``RegionSearch``) finds tracked faces again between full detections.
    ``fill_gaps``: show flow-carried faces for tracks the detector missed (detector input);
    with a faces file, frames without a face really have none.
    """

    def __init__(self, *, iou_min: float = 0.3, max_missing: int = 5, fill_gaps: bool = True,
                 smooth: bool = True, min_cutoff: float = 0.5, beta: float = 20.0, detect_every: int = 1):
        self.iou_min, self.max_missing, self.fill_gaps = iou_min, max_missing, fill_gaps
        self.smooth, self.min_cutoff, self.beta = smooth, min_cutoff, beta
        self.detect_every = detect_every
        self._tracks: list[_Track] = []
        self._next_id = 0
        self._prev_gray: np.ndarray | None = None
        self._ended: list[int] = []
        self._since_detection = detect_every  # frames since the last full-frame detection
        self._lost = False  # a face was lost between full detections

    @property
    def detection_due(self) -> bool:
        """Whether the next frame needs a full-frame detection: ``detect_every`` frames after
        the last one (new faces are only found there), or at once when a face was lost."""
        return self._since_detection + 1 >= self.detect_every or self._lost

    def take_ended(self) -> list[int]:
        """Ids of tracks that ended since the last call (their worker state can go)."""
        ended, self._ended = self._ended, []
        return ended

    def reset(self) -> None:
        """A scene cut: every track ends, and the next frame is searched whole."""
        self._ended.extend(t.id for t in self._tracks)
        self._tracks = []
        self._prev_gray = None
        self._since_detection = self.detect_every

    def update(self, t: float, detections: list[Face] | None, gray: np.ndarray | None = None,
               search: RegionSearch | None = None) -> list[Face]:
        """Faces with track ids for the frame at time ``t`` (seconds)."""
        carried: dict[int, Face] = {}
        if gray is not None and self._prev_gray is not None and self._prev_gray.shape == gray.shape:
            for track in self._tracks:
                moved = propagate_by_flow(self._prev_gray, gray, track.raw)
                if moved is not None:
                    carried[track.id] = moved
        # A copy: the frame's planes are pasted into later, by another thread.
        self._prev_gray = None if gray is None else gray.copy()

        if detections is not None:
            self._since_detection, self._lost = 0, False
            visible = self._assign(detections, carried)
        else:
            self._since_detection += 1
            visible = self._search(search, carried) if search is not None else self._carry(carried)
        return [self._show(track, t) for track in visible]

    def _cost(self, predicted: Face, detection: Face) -> float:
        """How badly ``detection`` matches a track predicted at ``predicted``; inf below ``iou_min``."""
        iou = box_iou(predicted.box, detection.box)
        if iou < self.iou_min:
            return math.inf
        spread = np.linalg.norm(predicted.landmarks - detection.landmarks, axis=1).mean() / max(predicted.size, 1.0)
        return (1 - iou) + spread

    def _assign(self, detections: list[Face], carried: dict[int, Face]) -> list[_Track]:
        tracks = self._tracks
        predicted = [carried.get(tr.id, tr.raw) for tr in tracks]
        matched_tracks, matched_dets = set(), set()
        if tracks and detections:
            cost = np.array([[min(self._cost(p, d), 1e6) for d in detections] for p in predicted])
            rows, cols = linear_sum_assignment(cost)
            for i, j in zip(rows, cols):
                if cost[i, j] < 1e6:
                    tracks[i].raw, tracks[i].missing = detections[j], 0
                    matched_tracks.add(i)
                    matched_dets.add(j)
        visible = [tracks[i] for i in sorted(matched_tracks)]
        survivors = list(visible)
        for i, track in enumerate(tracks):
            if i not in matched_tracks and self._missed(track, carried, visible):
                survivors.append(track)
        for j, det in enumerate(detections):
            if j not in matched_dets:
                smoother = OneEuroFilter(self.min_cutoff, self.beta, SPEED_CUTOFF_HZ) if self.smooth else None
                track = _Track(self._next_id, det, smoother)
                self._next_id += 1
                survivors.append(track)
                visible.append(track)
        self._tracks = survivors
        return visible

    def _search(self, search: RegionSearch, carried: dict[int, Face]) -> list[_Track]:
        """Between full detections: each track takes the face nearest its prediction (flow, or
        its last place) among those the detector finds in the region around it; a face not
        found there (it jumped, or the prediction was wrong) is searched for again at once in a
        wider region, where the nearest face of about its size is taken."""
        found: dict[int, tuple[float, Face]] = {}  # track id -> (offset from its prediction, face)
        for track in self._tracks:
            predicted = carried.get(track.id, track.raw)
            face = self._nearest(predicted, search(predicted, REGION_MARGIN))
            if face is None:
                face = self._nearest_similar(predicted, search(predicted, REGION_RETRY_MARGIN))
            if face is not None:
                found[track.id] = (_offset(predicted, face), face)
        for a, b in itertools.combinations(list(found), 2):  # two tracks on one face: the nearer keeps it
            if a in found and b in found and box_iou(found[a][1].box, found[b][1].box) >= DUPLICATE_IOU:
                del found[a if found[a][0] > found[b][0] else b]
        visible, survivors = [], []
        for track in self._tracks:
            if track.id in found:
                track.raw, track.missing = found[track.id][1], 0
                visible.append(track)
                survivors.append(track)
            elif self._missed(track, carried, visible):
                self._lost |= track.missing == 1  # just lost: search the whole frame next
                survivors.append(track)
        self._tracks = survivors
        return visible

    def _carry(self, carried: dict[int, Face]) -> list[_Track]:
        """Between full detections, without region search: the faces the flow could carry."""
        visible = []
        for track in self._tracks:
            if track.id in carried:
                track.raw = carried[track.id]
                visible.append(track)
            elif track.missing == 0:
                self._lost = True  # the flow cannot follow a face just seen: search the whole frame next
        return visible

    def _nearest(self, predicted: Face, candidates: list[Face]) -> Face | None:
        """The candidate that matches ``predicted`` best (``_cost``), if any passes ``iou_min``."""
        costs = [self._cost(predicted, c) for c in candidates]
        return candidates[int(np.argmin(costs))] if costs and min(costs) < math.inf else None

    @staticmethod
    def _nearest_similar(predicted: Face, candidates: list[Face]) -> Face | None:
        """The candidate nearest ``predicted`` whose size is within ``RETRY_SIZE_RATIO`` of its."""
        similar = [c for c in candidates if 1 / RETRY_SIZE_RATIO <= c.size / max(predicted.size, 1.0) <= RETRY_SIZE_RATIO]
        return min(similar, key=lambda c: _offset(predicted, c)) if similar else None

    def _missed(self, track: _Track, carried: dict[int, Face], visible: list[_Track]) -> bool:
        """A search that did not find ``track``: False if the track ends; else it goes on, shown
        where the flow carried it (if ``fill_gaps``)."""
        track.missing += 1
        if track.missing > self.max_missing:
            self._ended.append(track.id)
            return False
        if self.fill_gaps and track.id in carried:
            track.raw = carried[track.id]
            visible.append(track)
        return True

    def _show(self, track: _Track, t: float) -> Face:
        raw = track.raw
        lm, box = raw.landmarks, raw.box
        if track.smoother is not None:
            points = track.smoother(np.vstack([lm, box.reshape(2, 2)]), t, raw.size)
            lm, box = points[:5], points[5:].reshape(4)
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
