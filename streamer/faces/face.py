"""A face as the pipeline sees it, and the mapping between coded-frame and displayed-frame
coordinates (streams may carry rotation metadata; people and detectors think upright)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Face:
    landmarks: np.ndarray  # (5, 2) float64, coded-frame pixels
    box: np.ndarray  # (4,) x0, y0, x1, y1
    score: float = 1.0
    track: int = -1  # assigned by the tracker
    interpolated: bool = False  # filled in by the tracker between detections

    @property
    def size(self) -> float:
        return float(min(self.box[2] - self.box[0], self.box[3] - self.box[1]))


def box_from_landmarks(landmarks: np.ndarray, grow: float = 0.5) -> np.ndarray:
    lo, hi = landmarks.min(axis=0), landmarks.max(axis=0)
    pad = (hi - lo) * grow / 2 + 1
    return np.concatenate([lo - pad, hi + pad])


# ------------------------------------------------------------------ rotation

def display_rotation_steps(rotation: float) -> int:
    """Quarter turns (counter-clockwise) from coded to displayed frame, for np.rot90."""
    return int(round(rotation / 90.0)) % 4


def display_transform(width: int, height: int, steps: int) -> np.ndarray:
    """3x3 matrix taking coded-frame pixel coordinates to displayed-frame ones
    (matching ``np.rot90(coded, steps)``; pixel centres at integer coordinates)."""
    w, h = width - 1, height - 1
    return {
        0: np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1]], float),
        1: np.array([[0, 1, 0], [-1, 0, w], [0, 0, 1]], float),
        2: np.array([[-1, 0, w], [0, -1, h], [0, 0, 1]], float),
        3: np.array([[0, -1, h], [1, 0, 0], [0, 0, 1]], float),
    }[steps % 4]


def transform_points(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    return pts @ matrix[:2, :2].T + matrix[:2, 2]


def transform_face(face: Face, matrix: np.ndarray) -> Face:
    corners = transform_points(matrix, face.box[[0, 1, 2, 3, 0, 3, 2, 1]].reshape(4, 2))
    box = np.concatenate([corners.min(axis=0), corners.max(axis=0)])
    return Face(transform_points(matrix, face.landmarks), box, face.score, face.track, face.interpolated)
