"""Faces as the pipeline sees them, the ``--faces`` file format, and the mapping between
coded-frame and displayed-frame coordinates.

``--faces FILE`` is JSON Lines, one object per frame that has faces:

    {"frame": 12, "faces": [{"landmarks": [[x, y] x 5], "box": [x0, y0, x1, y1], "score": 0.99,
                             "track": 3}]}

``frame`` is the 0-based index in decode order; landmarks are in RetinaFace order (left eye,
right eye, nose tip, left mouth corner, right mouth corner; "left" = image left); all
coordinates are pixels of the *displayed* frame (after the stream's rotation metadata is
applied). ``box``, ``score`` and ``track`` are optional (the box defaults to the landmarks'
bounds grown by 50%, the score to 1). Frames not listed have no faces.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np


class FacesFileError(ValueError):
    """The faces file is unreadable or malformed; the message names the line."""


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


# ------------------------------------------------------------------ the --faces file

def _parse_face(obj, where: str) -> Face:
    if not isinstance(obj, dict) or "landmarks" not in obj:
        raise FacesFileError(f"{where}: each face needs 'landmarks' (5 [x, y] pairs)")
    try:
        lm = np.asarray(obj["landmarks"], dtype=np.float64)
    except (TypeError, ValueError):
        raise FacesFileError(f"{where}: landmarks must be numbers") from None
    if lm.shape != (5, 2) or not np.all(np.isfinite(lm)):
        raise FacesFileError(f"{where}: landmarks must be 5 finite [x, y] pairs, got shape {lm.shape}")
    if "box" in obj:
        try:
            box = np.asarray(obj["box"], dtype=np.float64)
        except (TypeError, ValueError):
            raise FacesFileError(f"{where}: box must be numbers") from None
        if box.shape != (4,) or not np.all(np.isfinite(box)) or box[2] <= box[0] or box[3] <= box[1]:
            raise FacesFileError(f"{where}: box must be [x0, y0, x1, y1] with x1 > x0 and y1 > y0")
    else:
        box = box_from_landmarks(lm)
    score = obj.get("score", 1.0)
    track = obj.get("track", -1)
    if not isinstance(score, (int, float)) or not isinstance(track, int):
        raise FacesFileError(f"{where}: score must be a number and track an integer")
    return Face(lm, box, float(score), track)


def read_faces_file(path: str | Path) -> dict[int, list[Face]]:
    """Frame index -> faces, in displayed-frame coordinates."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise FacesFileError(f"cannot read faces file {path}: {exc}") from None
    frames: dict[int, list[Face]] = {}
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise FacesFileError(f"{where}: not JSON ({exc.msg})") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("frame"), int) or obj["frame"] < 0:
            raise FacesFileError(f"{where}: expected {{\"frame\": <index >= 0>, \"faces\": [...]}}")
        faces = obj.get("faces", [])
        if not isinstance(faces, list):
            raise FacesFileError(f"{where}: 'faces' must be a list")
        frames.setdefault(obj["frame"], []).extend(_parse_face(f, f"{where} face {i}") for i, f in enumerate(faces))
    return frames


def face_record(index: int, faces: list[Face]) -> dict:
    """One line of a faces file (displayed-frame coordinates expected)."""
    return {"frame": index, "faces": [
        {"landmarks": np.round(f.landmarks, 3).tolist(), "box": np.round(f.box, 3).tolist(),
         "score": round(float(f.score), 4), "track": int(f.track)} for f in faces]}
