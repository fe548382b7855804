"""Tracking faces through a generated clip with a detector that answers from the ground truth.

Why a stand-in: the real RetinaFace weights cannot be had here, and RetinaFace with
deterministic weights finds no real faces. ``TruthDetector`` is the production
``FaceDetector`` with one thing replaced: what the network answers. Every query (a whole
frame or a region) goes through the production geometry (``View``: upright, cropped, scaled),
and, when it is given a network, that network really runs on that exact input, so its time is
the real cost of the query; the faces it returns are the clip's true landmarks, the way
RetinaFace would report them:

- only faces the network is shown: at least ``VISIBLE_MIN`` of the face box inside the view,
  and the box at least ``MIN_FACE_PX`` in network pixels (RetinaFace's smallest anchor);
- with landmark noise of ``NOISE_PX`` in network pixels (its landmarks are regressed on a
  stride-8/16 grid: about a pixel at the scale it sees), so a face shown smaller is measured
  coarser; upscaling adds no detail, so never finer than ``NOISE_PX`` frame pixels. Half of
  the noise's variance is a shift shared by the five points (the regression is relative to
  one anchor), half is each point's own.

``track_clip`` runs a clip through ``FaceTracker`` the way ``streamer.analyze.Analyzer`` wires
it: a full-frame detection when ``tracker.detection_due``, else region search (or flow only).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import av
import numpy as np

from streamer.faces.detect import REGION_SIDE_PX, FaceDetector, View
from streamer.faces.face import Face, box_from_landmarks, display_transform, transform_points
from streamer.faces.track import FaceTracker, SceneCutDetector
from streamer.io.probe import luma
from tests.support.clips import FACE_BOX_GROW, Clip, landmark_error, visible_fraction

NOISE_PX = 1.0
VISIBLE_MIN = 0.7
MIN_FACE_PX = 16
TRUTH_SCORE = 0.99


@dataclass
class QueryCost:
    calls: int = 0
    seconds: list[float] = field(default_factory=list)  # per call: the real network on the real input

    @property
    def network_s(self) -> float:
        return sum(self.seconds)


class TruthDetector(FaceDetector):
    """``FaceDetector`` answering from ``clip``'s ground truth (see the module docstring).
    Set ``frame_index`` before each frame's queries."""

    def __init__(self, clip: Clip, net=None, *, max_side: int = 1280, region_side: int = REGION_SIDE_PX,
                 noise_px: float = NOISE_PX, seed: int = 0):
        super().__init__(net, max_side=max_side, region_side=region_side)
        self.heads = clip.heads if clip.heads is not None else [np.array(clip.landmarks)]
        self.noise_px, self.seed = noise_px, seed
        self.frame_index = 0
        self.cost = {"full": QueryCost(), "region": QueryCost()}
        self._kind = "full"

    def detect(self, rgb: np.ndarray, rotation_steps: int = 0) -> list[Face]:
        self._kind = "full"
        return super().detect(rgb, rotation_steps)

    def detect_region(self, rgb: np.ndarray, box: np.ndarray, rotation_steps: int = 0, **kwargs) -> list[Face]:
        self._kind = "region"
        return super().detect_region(rgb, box, rotation_steps, **kwargs)

    def detect_view(self, rgb: np.ndarray, view: View, threshold: float) -> list[Face]:
        cost = self.cost[self._kind]
        cost.calls += 1
        if self.net is not None:  # the real network on the real input: its time is the query's cost
            started = time.perf_counter()
            super().detect_view(rgb, view, threshold)
            cost.seconds.append(time.perf_counter() - started)
        to_coded = np.linalg.inv(display_transform(rgb.shape[1], rgb.shape[0], view.rotation_steps))
        rng = np.random.default_rng([self.seed, self.frame_index, *view.crop, *view.size])
        sigma = self.noise_px * max(1.0, view.scale)  # network pixels
        faces = []
        for head in self.heads:
            truth = transform_points(view.to_input, transform_points(to_coded, head[self.frame_index]))
            box = box_from_landmarks(truth, grow=FACE_BOX_GROW)
            shown = visible_fraction(box, -0.5, -0.5, view.size[0] - 0.5, view.size[1] - 0.5)
            if shown < VISIBLE_MIN or min(box[2] - box[0], box[3] - box[1]) < MIN_FACE_PX:
                continue
            shared, own = rng.normal(0, sigma / np.sqrt(2), 2), rng.normal(0, sigma / np.sqrt(2), truth.shape)
            landmarks = truth + shared + own
            faces.append(view.to_frame(Face(landmarks, box_from_landmarks(landmarks, grow=FACE_BOX_GROW), TRUTH_SCORE)))
        return faces


@dataclass
class Tracked:
    shown: list[list[Face]]  # per frame, the tracker's faces (what GPEN would be given)
    ended: dict[int, int]  # track id -> the frame at which the tracker said it ended


def track_clip(clip: Clip, detector: TruthDetector, *, detect_every: int, regions: bool = True,
               smooth: bool = True) -> Tracked:
    """Every frame of ``clip`` through the tracker."""
    tracker = FaceTracker(detect_every=detect_every, smooth=smooth)
    cuts = SceneCutDetector()
    shown, ended = [], {}
    with av.open(str(clip.path)) as container:
        for index, frame in enumerate(container.decode(video=0)):
            detector.frame_index = index
            gray, rgb = luma(frame), frame.to_ndarray(format="rgb24")
            if cuts(gray):
                tracker.reset()
            detections = detector.detect(rgb) if tracker.detection_due else None
            search = _region_search(detector, rgb) if regions and detections is None else None
            shown.append(tracker.update(float(frame.pts * frame.time_base), detections, gray, search))
            ended.update((track, index) for track in tracker.take_ended())
    return Tracked(shown, ended)


def _region_search(detector: FaceDetector, rgb: np.ndarray):
    """This frame's ``streamer.faces.track.RegionSearch``, as the Analyzer makes it."""
    def search(face: Face, margin: float) -> list[Face]:
        return detector.detect_region(rgb, face.box, margin=margin)
    return search


@dataclass
class HeadErrors:
    """Per frame, for one head: its landmark error (eye distances) where it is fully in view."""
    errors: dict[int, float] = field(default_factory=dict)  # frame -> error of the nearest face shown
    missed: list[int] = field(default_factory=list)  # frames where it was fully in view and no face was shown near it

    def values(self) -> np.ndarray:
        return np.array(list(self.errors.values()))


MATCH_MAX = 1.0  # a face shown further than this (eye distances) from a head is not that head's


def share_in_frame(clip: Clip, head: int, t: int) -> float:
    """The share of head ``head``'s face box inside the frame at frame ``t``."""
    box = box_from_landmarks(clip.heads[head][t], grow=FACE_BOX_GROW)
    return visible_fraction(box, 0, 0, clip.width, clip.height)


def head_errors(clip: Clip, shown: list[list[Face]]) -> list[HeadErrors]:
    """Per head of ``clip``: the landmark error of the face shown nearest it, per frame."""
    heads = clip.heads if clip.heads is not None else [np.array(clip.landmarks)]
    out = []
    for index, head in enumerate(heads):
        result = HeadErrors()
        for t, faces in enumerate(shown):
            if clip.heads is not None and share_in_frame(clip, index, t) < 1.0:
                continue
            errors = [landmark_error(f.landmarks, head[t]) for f in faces]
            if errors and min(errors) <= MATCH_MAX:
                result.errors[t] = min(errors)
            else:
                result.missed.append(t)
        out.append(result)
    return out
