"""The ``--faces`` file: precomputed faces in, the faces used out (``--dump-faces``).

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
from pathlib import Path

import numpy as np

from configs.errors import InputError
from streamer.faces.face import Face, box_from_landmarks


class FacesFileError(InputError):
    """The faces file is unreadable or malformed; the message names the line."""


def _numbers(value, where: str, what: str) -> np.ndarray:
    try:
        return np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError, OverflowError):  # OverflowError: an integer too large for a float
        raise FacesFileError(f"{where}: {what} must be numbers") from None


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # JSON true is not frame 1


def _parse_face(obj, where: str) -> Face:
    if not isinstance(obj, dict) or "landmarks" not in obj:
        raise FacesFileError(f"{where}: each face needs 'landmarks' (5 [x, y] pairs)")
    lm = _numbers(obj["landmarks"], where, "landmarks")
    if lm.shape != (5, 2) or not np.all(np.isfinite(lm)):
        raise FacesFileError(f"{where}: landmarks must be 5 finite [x, y] pairs, got shape {lm.shape}")
    if "box" in obj:
        box = _numbers(obj["box"], where, "box")
        if box.shape != (4,) or not np.all(np.isfinite(box)) or box[2] <= box[0] or box[3] <= box[1]:
            raise FacesFileError(f"{where}: box must be [x0, y0, x1, y1] with x1 > x0 and y1 > y0")
    else:
        box = box_from_landmarks(lm)
    score = obj.get("score", 1.0)
    track = obj.get("track", -1)
    score = _numbers(score, where, "score") if _is_int(score) or isinstance(score, float) else None
    if score is None or score.ndim or not np.isfinite(score) or not _is_int(track):
        raise FacesFileError(f"{where}: score must be a finite number and track an integer")
    return Face(lm, box, float(score), track)


def read_faces_file(path: str | Path) -> dict[int, list[Face]]:
    """Frame index -> faces, in displayed-frame coordinates."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise FacesFileError(f"cannot read faces file {path}: {exc}") from None
    frames: dict[int, list[Face]] = {}
    # JSON Lines ends lines at "\n" only: str.splitlines() would also split at characters a JSON
    # string may hold raw (form feed, U+2028, ...), rejecting a valid file with wrong line numbers.
    for number, raw in enumerate(data.split(b"\n"), 1):
        where = f"{path}:{number}"
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise FacesFileError(f"{where}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise FacesFileError(f"{where}: not JSON ({exc.msg})") from None
        except RecursionError:
            raise FacesFileError(f"{where}: JSON nested too deeply") from None
        if not isinstance(obj, dict) or not _is_int(obj.get("frame")) or obj["frame"] < 0:
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
