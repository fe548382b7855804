"""Face detection with facexlib's RetinaFace (ResNet-50 or MobileNet-0.25).

Weights come from gpen-stream's weight cache (SHA-256 checked) and are read with
``weights_only=True``; facexlib's own downloader is never used. Frames are shown to the
network upright (the stream's display rotation applied) and downscaled so their long side is
at most ``max_side``; results are mapped back to coded-frame pixels.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import cv2
import numpy as np
import torch

from gpen.checkpoint import CheckpointError, read_state_dict
from gpen.weights import WeightsError, locate
from streamer.faces.face import Face, display_transform, transform_face

log = logging.getLogger(__name__)

NETWORKS = {"retinaface_resnet50": "resnet50", "retinaface_mobile0.25": "mobile0.25"}
NMS_THRESHOLD = 0.4


class DetectorUnavailable(RuntimeError):
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


class FaceDetector:
    def __init__(self, net: torch.nn.Module, *, threshold: float = 0.9, max_side: int = 1280):
        self.net = net
        self.threshold = threshold
        self.max_side = max_side

    @torch.inference_mode()
    def detect(self, rgb: np.ndarray, rotation_steps: int = 0) -> list[Face]:
        """Faces in ``rgb`` (a coded frame), in coded-frame pixels."""
        h, w = rgb.shape[:2]
        upright = np.rot90(rgb, rotation_steps) if rotation_steps else rgb
        scale = min(1.0, self.max_side / max(upright.shape[:2]))
        bgr = np.ascontiguousarray(upright[:, :, ::-1])
        sx = sy = 1.0
        if scale < 1.0:
            size = (max(1, round(bgr.shape[1] * scale)), max(1, round(bgr.shape[0] * scale)))
            sx, sy = size[0] / bgr.shape[1], size[1] / bgr.shape[0]
            bgr = cv2.resize(bgr, size, interpolation=cv2.INTER_AREA)
        dets = self.net.detect_faces(bgr, conf_threshold=self.threshold, nms_threshold=NMS_THRESHOLD,
                                     use_origin_size=True)
        to_coded = np.linalg.inv(display_transform(w, h, rotation_steps))
        faces = []
        # back to full-size pixels through pixel centres: x_full = (x_small + 0.5) / s - 0.5
        unscale = lambda pts: (pts.reshape(-1, 2) + 0.5) / (sx, sy) - 0.5  # noqa: E731
        for det in np.asarray(dets, dtype=np.float64).reshape(-1, 15):
            if not np.all(np.isfinite(det)):
                continue
            face = Face(landmarks=unscale(det[5:15]), box=unscale(det[:4]).reshape(4), score=float(det[4]))
            faces.append(transform_face(face, to_coded) if rotation_steps else face)
        return faces
