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
