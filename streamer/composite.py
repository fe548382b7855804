"""Cutting faces out of frames and putting restored faces back.

Both directions work on the frame's own planar YUV (see ``streamer.io.yuv``) and touch only the
face's box, not the whole frame (facexlib warps the whole frame per face, ~25x slower):

- ``cut_crop``: convert the frame region a crop covers to RGB and warp it to the aligned crop;
- ``Compositor.paste``: warp the restored crop and a feathered mask back into that region,
  convert to the stream's YUV and alpha-blend into the planes (the mask averaged down for
  subsampled chroma). Pixels outside every face box stay exactly as decoded. Overlapping
  faces are layered smallest first, so the nearest (largest) face ends on top.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import av
import cv2
import numpy as np

from streamer.faces.align import invert
from streamer.io.yuv import YUVLayout, plane, region_rgb

WARP_MARGIN = 3  # source pixels beyond the crop's footprint that cubic sampling may touch
INTERPOLATION = cv2.INTER_CUBIC  # sharper than bilinear, so a face survives cut + paste with less blur


@lru_cache(maxsize=16)
def crop_mask(size: int, inset: float, feather: float) -> np.ndarray:
    """Paste mask in crop space: 1 inside a square inset from the crop's edge by ``inset``
    (fraction of the size), falling off with a Gaussian of sigma ``feather`` * size, and
    exactly 0 on the crop's border (so nothing outside the crop is ever touched)."""
    mask = np.zeros((size, size), np.float32)
    lo = int(round(inset * size))
    mask[lo:size - lo, lo:size - lo] = 1.0
    sigma = feather * size
    if sigma > 0:
        k = int(2 * round(3 * sigma) + 1)
        mask = cv2.GaussianBlur(mask, (k, k), sigma, borderType=cv2.BORDER_CONSTANT)
    edge = max(1, int(round(sigma)))
    ramp = np.clip(np.minimum(np.arange(size), np.arange(size)[::-1]) / edge, 0, 1).astype(np.float32)
    mask *= np.minimum(ramp[:, None], ramp[None, :])  # reach 0 at the border whatever the blur
    mask.setflags(write=False)
    return mask


def prepare_face(input_crop: np.ndarray, restored: np.ndarray, *, strength: float, color_match: bool,
                 mask: np.ndarray) -> np.ndarray:
    """The crop to paste (float32): the restored face, optionally shifted to the input's mean
    colour under the mask (GPEN can drift in tint), blended with the input by ``strength``."""
    out = restored.astype(np.float32)
    src = input_crop.astype(np.float32)
    if color_match:
        flat_mask = mask.reshape(-1)
        shift = flat_mask @ (src - out).reshape(-1, 3) / max(float(flat_mask.sum()), 1.0)
        out += shift
    if strength < 1.0:
        out = src + strength * (out - src)
    return out


@dataclass
class Box:
    x0: int
    y0: int
    x1: int
    y1: int

    @property
    def area(self) -> int:
        return (self.x1 - self.x0) * (self.y1 - self.y0)

    def shift(self, affine: np.ndarray) -> np.ndarray:
        """``affine`` (frame -> crop) re-expressed for coordinates relative to this box."""
        out = np.asarray(affine, dtype=np.float64).copy()
        out[:, 2] += out[:, :2] @ np.array([self.x0, self.y0], dtype=np.float64)
        return out


def crop_footprint(affine: np.ndarray, size: int, width: int, height: int, layout: YUVLayout,
                   margin: int = 0) -> Box | None:
    """The frame box a size x size crop covers (plus ``margin``), clipped to the frame and
    aligned to the chroma grid; None if the crop misses the frame."""
    ax, ay = 1 << layout.shift[0], 1 << layout.shift[1]
    corners = np.array([[0, 0], [size, 0], [size, size], [0, size]], dtype=np.float64)
    inv = invert(affine)
    pts = corners @ inv[:, :2].T + inv[:, 2]
    x0, y0 = np.floor(pts.min(axis=0)).astype(int) - margin
    x1, y1 = np.ceil(pts.max(axis=0)).astype(int) + 1 + margin
    x0, y0 = max(0, x0 - x0 % ax), max(0, y0 - y0 % ay)
    x1 = min(width - width % ax, x1 + (-x1) % ax)
    y1 = min(height - height % ay, y1 + (-y1) % ay)
    if x1 <= x0 or y1 <= y0:
        return None
    return Box(int(x0), int(y0), int(x1), int(y1))


def cut_crop(frame: av.VideoFrame, layout: YUVLayout, affine: np.ndarray, size: int) -> np.ndarray | None:
    """The aligned size x size RGB crop (uint8), or None if the face is outside the frame.
    Pixels beyond the frame repeat its edge, so a face cut by the edge shows no black wedge."""
    box = crop_footprint(affine, size, frame.width, frame.height, layout, margin=WARP_MARGIN)
    if box is None:
        return None
    rgb = region_rgb(frame, layout, box.x0, box.y0, box.x1, box.y1)
    crop = cv2.warpAffine(rgb, box.shift(affine), (size, size), flags=INTERPOLATION,
                          borderMode=cv2.BORDER_REPLICATE)
    return np.clip(crop + 0.5, 0, 255).astype(np.uint8)


class Compositor:
    """Pastes faces into frames of one planar YUV layout."""

    def __init__(self, layout: YUVLayout, *, mask_inset: float, mask_feather: float):
        self.layout = layout
        self.mask_inset, self.mask_feather = mask_inset, mask_feather

    def mask(self, size: int) -> np.ndarray:
        return crop_mask(size, self.mask_inset, self.mask_feather)

    def paste(self, frame: av.VideoFrame, faces: list[tuple]) -> int:
        """Blend ``faces`` ([(crop SxSx3 RGB float or uint8, affine frame->crop 2x3, mask or
        None)]) into ``frame`` (writable, in ``layout``) in place; a None mask is the feathered
        square. Returns how many were pasted."""
        placed = []
        for crop, affine, mask in faces:
            box = crop_footprint(affine, crop.shape[0], frame.width, frame.height, self.layout)
            if box is not None:
                placed.append((box, crop, affine, self.mask(crop.shape[0]) if mask is None else mask))
        placed.sort(key=lambda item: item[0].area)
        planes = [plane(frame, i, self.layout.dtype) for i in range(3)]
        for box, crop, affine, mask in placed:
            self._paste_one(planes, box, crop, affine, mask)
        return len(placed)

    def _paste_one(self, planes: list[np.ndarray], box: Box, crop: np.ndarray, affine: np.ndarray,
                   mask: np.ndarray) -> None:
        w, h = box.x1 - box.x0, box.y1 - box.y0
        to_crop = box.shift(affine)
        face = cv2.warpAffine(crop.astype(np.float32), to_crop, (w, h), flags=INTERPOLATION | cv2.WARP_INVERSE_MAP,
                              borderMode=cv2.BORDER_REPLICATE)
        alpha = cv2.warpAffine(mask, to_crop, (w, h), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                               borderMode=cv2.BORDER_CONSTANT, borderValue=0)
        top = float(np.iinfo(self.layout.dtype).max)
        sx, sy = self.layout.shift
        for index, (target, source) in enumerate(zip(planes, self.layout.from_rgb(face))):
            shift_x, shift_y = (0, 0) if index == 0 else (sx, sy)
            region = target[box.y0 >> shift_y:(box.y0 >> shift_y) + source.shape[0],
                            box.x0 >> shift_x:(box.x0 >> shift_x) + source.shape[1]]
            a = alpha if index == 0 else self.layout.subsample(alpha)
            blended = region + a * (source - region)
            region[...] = np.clip(blended + 0.5, 0, top).astype(self.layout.dtype)
