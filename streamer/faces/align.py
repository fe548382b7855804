"""Face alignment to GPEN's own 5-point template (GPEN's align_faces.py), not facexlib's FFHQ
template: the released checkpoints were run on crops made this way.

The template is the classic 96x112 five-point layout (eyes, nose tip, mouth corners), made
square (x + 8) and padded by 25% on every side (+28), i.e. a 168x168 reference scaled to the
model size: points = (template + (36, 28)) * size / 168.
"""

from __future__ import annotations

import cv2
import numpy as np

TEMPLATE_96x112 = np.array([
    [30.29459953, 51.69630051],  # left eye (image left)
    [65.53179932, 51.50139999],  # right eye
    [48.02519989, 71.73660278],  # nose tip
    [33.54930115, 92.3655014],   # left mouth corner
    [62.72990036, 92.20410156],  # right mouth corner
])
TEMPLATE_OFFSET = np.array([36.0, 28.0])  # square (+8 in x) and 25% inner padding (+28)
TEMPLATE_SPAN = 168.0


class AlignmentError(ValueError):
    """Landmarks that define no usable similarity (collinear, coincident, non-finite)."""


def reference_points(size: int) -> np.ndarray:
    """GPEN's 5 reference points for a size x size crop, float64 (5, 2)."""
    return (TEMPLATE_96x112 + TEMPLATE_OFFSET) * (size / TEMPLATE_SPAN)


def similarity(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """The least-squares similarity (rotation, uniform scale, translation; no reflection)
    taking points ``src`` to ``dst`` (Umeyama 1991). Returns a 2x3 float64 matrix."""
    src = np.asarray(src, dtype=np.float64)
    dst = np.asarray(dst, dtype=np.float64)
    if src.shape != dst.shape or src.ndim != 2 or src.shape[1] != 2 or not np.all(np.isfinite(src)):
        raise AlignmentError(f"need matching finite (N, 2) point sets, got {src.shape} and {dst.shape}")
    src_mean, dst_mean = src.mean(axis=0), dst.mean(axis=0)
    src_c, dst_c = src - src_mean, dst - dst_mean
    src_var = (src_c**2).sum() / len(src)
    if src_var < 1e-6:
        raise AlignmentError("landmarks coincide")
    cov = dst_c.T @ src_c / len(src)
    u, sigma, vt = np.linalg.svd(cov)
    d = np.ones(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:  # the best fit would mirror: flip the weakest axis
        d[-1] = -1
    rotation = u @ np.diag(d) @ vt
    scale = (sigma * d).sum() / src_var
    if not np.isfinite(scale) or scale <= 0:
        raise AlignmentError("landmarks define no similarity")
    m = np.empty((2, 3))
    m[:, :2] = scale * rotation
    m[:, 2] = dst_mean - scale * rotation @ src_mean
    return m


def invert(affine: np.ndarray) -> np.ndarray:
    """Inverse of a 2x3 affine."""
    return cv2.invertAffineTransform(np.asarray(affine, dtype=np.float64))


def alignment(landmarks: np.ndarray, size: int) -> np.ndarray:
    """2x3 affine mapping frame pixels to a size x size GPEN crop of the face."""
    return similarity(landmarks, reference_points(size))
