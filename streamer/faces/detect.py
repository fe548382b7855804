"""Face detection with facexlib's RetinaFace (ResNet-50 or MobileNet-0.25).

Weights come from gpen-stream's weight cache (SHA-256 checked) and are read with
``weights_only=True``; facexlib's own downloader is never used. The network is shown a
``View`` of a coded frame: turned upright (the stream's display rotation applied), cropped
and scaled; results are mapped back to coded-frame pixels.

- ``FaceDetector.detect``: the whole frame, downscaled so its long side is at most ``max_side``.
- ``FaceDetector.detect_region``: the square around one face's box (the box grown by
  ``margin`` of its size on each side), scaled to ``REGION_SIDE_PX``. Between full-frame
  detections the tracker finds each face again this way: at 720p a region costs ~6% of the
  whole frame with ResNet-50 (~10% with MobileNet-0.25, whose small layers carry a larger
  fixed cost), and gives measured landmarks rather than flow-carried ones.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch

from configs.errors import InputError
from gpen.checkpoint import CheckpointError, read_state_dict
from gpen.weights import WeightsError, locate
from streamer.faces.face import Face, display_transform, transform_face, transform_points

log = logging.getLogger(__name__)

NETWORKS = {"retinaface_resnet50": "resnet50", "retinaface_mobile0.25": "mobile0.25"}
# The most faces one picture can yield (by score); a crowd beyond it is not a restoration job.
MAX_DETECTIONS = 100
NMS_THRESHOLD = 0.4


class DetectorUnavailable(InputError):
    """The detector cannot run (missing or bad weights, unknown name)."""


def load_retinaface(name: str, device: torch.device, weights: str | Path | None = None,
                    allow_download: bool = True) -> torch.nn.Module:
    if name not in NETWORKS:
        raise DetectorUnavailable(f"unknown detector '{name}'; use one of {', '.join(NETWORKS)}")
    try:
        weights = locate(name, weights, allow_download=allow_download)
        state = read_state_dict(weights)  # weights_only; drops DataParallel's "module." prefix
    except (WeightsError, CheckpointError) as exc:
        raise DetectorUnavailable(str(exc)) from None
    with warnings.catch_warnings():  # torchvision's deprecation notes about facexlib's backbone call
        warnings.simplefilter("ignore")
        from facexlib.detection.retinaface import RetinaFace

        net = RetinaFace(network_name=NETWORKS[name], half=False, phase="test", device=device)
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise DetectorUnavailable(f"{weights} does not match {name}: {str(exc).splitlines()[0]}") from None
    return net.to(device).eval()


REGION_SIDE_PX = 224  # a region's side in network pixels: the face is 112 px at margin 0.5, a size RetinaFace
#                       finds reliably and places landmarks well on (its anchors run 16-512 px), for 5% of a
#                       720p frame's pixels (bench/tracking.py: 192 is cheaper and coarser, 256 the reverse)
REGION_THRESHOLD = 0.5  # score that keeps a tracked face in its region (a new face needs the full threshold;
#                         a lower full threshold applies to regions too)
MIN_REGION_PX = 8  # a region clipped by the frame edge to fewer pixels than this is not searched


def _scaling(sx: float, sy: float) -> np.ndarray:
    """Resizing an image by (sx, sy), in pixel-centre coordinates: x' = (x + 0.5) * sx - 0.5."""
    return np.array([[sx, 0, 0.5 * sx - 0.5], [0, sy, 0.5 * sy - 0.5], [0, 0, 1]])


def _translation(dx: float, dy: float) -> np.ndarray:
    return np.array([[1, 0, dx], [0, 1, dy], [0, 0, 1]], float)


@dataclass(frozen=True)
class View:
    """What the network is shown of a coded frame: the frame turned upright, cropped to
    ``crop`` (x0, y0, x1, y1 in upright pixels) and resized to ``size`` (width, height).
    ``to_input`` maps coded-frame pixels to network-input pixels."""

    rotation_steps: int
    crop: tuple[int, int, int, int]
    size: tuple[int, int]
    to_input: np.ndarray

    @classmethod
    def make(cls, width: int, height: int, rotation_steps: int, crop: tuple[int, int, int, int],
             size: tuple[int, int]) -> View:
        """``width`` x ``height``: the coded frame."""
        x0, y0, x1, y1 = crop
        upright = display_transform(width, height, rotation_steps)
        scaling = _scaling(size[0] / (x1 - x0), size[1] / (y1 - y0))
        return cls(rotation_steps, crop, size, scaling @ _translation(-x0, -y0) @ upright)

    @classmethod
    def whole(cls, width: int, height: int, rotation_steps: int, max_side: int) -> View:
        """The whole frame, downscaled so its long side is at most ``max_side``."""
        w, h = (height, width) if rotation_steps % 2 else (width, height)
        scale = min(1.0, max_side / max(w, h))
        size = (max(1, round(w * scale)), max(1, round(h * scale))) if scale < 1.0 else (w, h)
        return cls.make(width, height, rotation_steps, (0, 0, w, h), size)

    @classmethod
    def around(cls, box: np.ndarray, width: int, height: int, rotation_steps: int, margin: float,
               side_px: int = REGION_SIDE_PX) -> View | None:
        """The square centred on ``box`` (coded-frame pixels) with side ``(1 + 2 * margin)``
        times the box's long side (upright), clipped to the frame and scaled so that the full
        square would be ``side_px``; None when too little of it is inside the frame."""
        upright = display_transform(width, height, rotation_steps)
        corners = transform_points(upright, box[[0, 1, 2, 3, 0, 3, 2, 1]])
        (bx0, by0), (bx1, by1) = corners.min(axis=0), corners.max(axis=0)
        side = max(bx1 - bx0, by1 - by0) * (1 + 2 * margin)
        if not np.isfinite(side) or side < MIN_REGION_PX:
            return None
        cx, cy = (bx0 + bx1) / 2, (by0 + by1) / 2
        w, h = (height, width) if rotation_steps % 2 else (width, height)
        x0, y0 = max(0, round(cx - side / 2)), max(0, round(cy - side / 2))
        x1, y1 = min(w, round(cx + side / 2)), min(h, round(cy + side / 2))
        if x1 - x0 < MIN_REGION_PX or y1 - y0 < MIN_REGION_PX:
            return None
        scale = side_px / side
        size = (max(1, round((x1 - x0) * scale)), max(1, round((y1 - y0) * scale)))
        return cls.make(width, height, rotation_steps, (x0, y0, x1, y1), size)

    @property
    def scale(self) -> float:
        """Network pixels per frame pixel."""
        return float(np.sqrt(abs(np.linalg.det(self.to_input[:2, :2]))))

    def image(self, rgb: np.ndarray) -> np.ndarray:
        """The network's input: BGR uint8, ``size``."""
        x0, y0, x1, y1 = self.crop
        upright = np.rot90(rgb, self.rotation_steps) if self.rotation_steps else rgb
        bgr = np.ascontiguousarray(upright[y0:y1, x0:x1, ::-1])
        if (x1 - x0, y1 - y0) == self.size:
            return bgr
        shrink = self.size[0] < x1 - x0
        return cv2.resize(bgr, self.size, interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)

    def to_frame(self, face: Face) -> Face:
        """A face found in the network's input, in coded-frame pixels."""
        return transform_face(face, np.linalg.inv(self.to_input))


class FaceDetector:
    def __init__(self, net: torch.nn.Module, *, threshold: float = 0.9, max_side: int = 1280,
                 region_side: int = REGION_SIDE_PX):
        self.net = net
        self.threshold = threshold
        self.max_side = max_side
        self.region_side = region_side

    def detect(self, rgb: np.ndarray, rotation_steps: int = 0) -> list[Face]:
        """Faces in ``rgb`` (a coded frame), in coded-frame pixels."""
        h, w = rgb.shape[:2]
        return self.detect_view(rgb, View.whole(w, h, rotation_steps, self.max_side), self.threshold)

    def detect_region(self, rgb: np.ndarray, box: np.ndarray, rotation_steps: int = 0, *, margin: float,
                      threshold: float = REGION_THRESHOLD) -> list[Face]:
        """Faces in the region around ``box`` (see ``View.around``; scaled to ``region_side``) of
        ``rgb`` (a coded frame), in coded-frame pixels, scored at least ``threshold``."""
        h, w = rgb.shape[:2]
        view = View.around(np.asarray(box, np.float64), w, h, rotation_steps, margin, self.region_side)
        return [] if view is None else self.detect_view(rgb, view, threshold)

    @torch.inference_mode()
    def detect_view(self, rgb: np.ndarray, view: View, threshold: float) -> list[Face]:
        """Faces the network finds in ``view`` of ``rgb``, in coded-frame pixels."""
        dets = self.net.detect_faces(view.image(rgb), conf_threshold=threshold, nms_threshold=NMS_THRESHOLD,
                                     use_origin_size=True)
        dets = np.asarray(dets, dtype=np.float64).reshape(-1, 15)
        dets = dets[np.argsort(-dets[:, 4], kind="stable")[:MAX_DETECTIONS]]
        faces = []
        for det in dets:
            if np.all(np.isfinite(det)):
                faces.append(view.to_frame(Face(landmarks=det[5:15].reshape(5, 2), box=det[:4], score=float(det[4]))))
        return faces
