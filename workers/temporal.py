"""Per-track temporal state in a worker: restored faces that do not flicker.

GPEN restores each crop on its own, so small input changes (noise, compression, a pixel of
landmark jitter) give visibly different faces frame to frame. For each track we keep the
previous *output* crop and blend it into the new one, in aligned space:

1. Compensate motion. How the content moved between two crops depends on why the crops
   differ: if the landmarks tracked a moving face, the face sits still in crop space; if a
   still face's landmarks jittered, the content moved by the crops' relative affine
   A_prev o A_cur^-1 (both map frame pixels to crop pixels). We try both on low-passed
   thumbnails of the two *input* crops, keep the better, and refine it with ECC image
   registration, so whatever mix of the two happened is undone.
2. Measure where the input really changed after that alignment: the remaining difference of
   the low-passed thumbnails. Low-passing removes per-frame noise, so what remains is
   expression, occlusion, lighting, or motion the affine could not explain.
3. Blend with a per-pixel weight w = blend_max * exp(-(change / blend_sigma)^2): where nothing
   changed the previous face carries on (a recursive average), where something changed the
   new face wins, so moving parts do not leave ghosts.

A track's state is dropped on ``reset`` (scene cut, new worker), when frames were skipped, on
``end_track``/``bye``, or, least recently used first, when all states together exceed
``max_bytes``. States are kept in float16 (ample for 0..255 images).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import cv2
import numpy as np

LOWPASS_SIZE = 128  # motion and change are measured on a 128x128 thumbnail of the crop
MAX_FRAME_GAP = 2  # a track that skipped more frames than this starts afresh
ECC_CRITERIA = (cv2.TERM_CRITERIA_COUNT | cv2.TERM_CRITERIA_EPS, 40, 1e-4)
CHANGE_DILATE = 3  # a moving edge also stops blending this many thumbnail pixels around it
STATE_INTERP = cv2.INTER_CUBIC  # the recursive state is resampled every frame: keep it sharp


@dataclass
class _TrackState:
    frame: int
    affine: np.ndarray  # 3x3, frame -> crop
    output: np.ndarray  # S x S x 3 float16
    lowpass: np.ndarray  # LOWPASS_SIZE^2 x 3 float32, the input's thumbnail


def _as3x3(affine) -> np.ndarray:
    m = np.eye(3)
    m[:2] = np.asarray(affine, dtype=np.float64)
    return m


def _thumbnail(crop: np.ndarray) -> np.ndarray:
    small = cv2.resize(crop.astype(np.float32), (LOWPASS_SIZE, LOWPASS_SIZE), interpolation=cv2.INTER_AREA)
    return cv2.GaussianBlur(small, (5, 5), 1.0)


class TemporalBlender:
    def __init__(self, blend_max: float, blend_sigma: float, max_bytes: int = 1 << 30):
        self.blend_max = blend_max
        self.blend_sigma = blend_sigma
        self.max_bytes = max_bytes
        self._tracks: OrderedDict[tuple, _TrackState] = OrderedDict()
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._tracks)

    def drop(self, key_prefix: tuple) -> None:
        """Forget every track whose key starts with ``key_prefix``."""
        for key in [k for k in self._tracks if k[:len(key_prefix)] == key_prefix]:
            self._forget(key)

    def _forget(self, key: tuple) -> None:
        state = self._tracks.pop(key)
        self._bytes -= state.output.nbytes + state.lowpass.nbytes

    def blend(self, key: tuple, frame: int, affine, input_crop: np.ndarray, restored: np.ndarray,
              *, reset: bool = False) -> np.ndarray:
        """The temporally stable output for one crop (uint8, same shape as ``restored``)."""
        a_cur = _as3x3(affine)
        lowpass = _thumbnail(input_crop)
        prev = None if reset else self._tracks.get(key)
        if prev is not None and not (0 < frame - prev.frame <= MAX_FRAME_GAP):
            prev = None
        out = restored.astype(np.float32)
        if prev is not None and self.blend_max > 0:
            out = self._blend_with(prev, a_cur, lowpass, out)
        if key in self._tracks:
            self._forget(key)
        state = _TrackState(frame, a_cur, out.astype(np.float16), lowpass)
        self._tracks[key] = state
        self._bytes += state.output.nbytes + state.lowpass.nbytes
        while self._bytes > self.max_bytes and len(self._tracks) > 1:
            self._forget(next(iter(self._tracks)))  # least recently used
        return np.clip(out + 0.5, 0, 255).astype(np.uint8)

    def _blend_with(self, prev: _TrackState, a_cur: np.ndarray, lowpass: np.ndarray,
                    restored: np.ndarray) -> np.ndarray:
        size = restored.shape[0]
        scale = np.diag([LOWPASS_SIZE / size, LOWPASS_SIZE / size, 1.0])
        # warp taking current-crop coordinates to previous-crop coordinates, at thumbnail scale
        warp = _register(prev.lowpass, lowpass,
                         [np.eye(3), scale @ prev.affine @ np.linalg.inv(a_cur) @ np.linalg.inv(scale)])
        inverse = cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP
        prev_low = cv2.warpAffine(prev.lowpass, warp[:2], (LOWPASS_SIZE, LOWPASS_SIZE), flags=inverse,
                                  borderMode=cv2.BORDER_CONSTANT, borderValue=(-1e4, -1e4, -1e4))
        change = np.abs(lowpass - prev_low).mean(axis=2) / 255.0  # regions the old crop did not cover: huge
        change = cv2.dilate(change, np.ones((CHANGE_DILATE, CHANGE_DILATE), np.uint8))
        weight = self.blend_max * np.exp(-np.square(change / self.blend_sigma))
        weight = cv2.resize(weight, (size, size), interpolation=cv2.INTER_LINEAR)[:, :, None]
        full = np.linalg.inv(scale) @ warp @ scale
        prev_out = cv2.warpAffine(prev.output.astype(np.float32), full[:2], (size, size),
                                  flags=STATE_INTERP | cv2.WARP_INVERSE_MAP,
                                  borderMode=cv2.BORDER_REPLICATE)
        return restored + weight * (prev_out - restored)


def _gray(thumbnail: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(thumbnail, cv2.COLOR_RGB2GRAY)


def _residual(prev: np.ndarray, cur: np.ndarray, warp: np.ndarray) -> float:
    warped = cv2.warpAffine(prev, warp[:2].astype(np.float32), (LOWPASS_SIZE, LOWPASS_SIZE),
                            flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP, borderMode=cv2.BORDER_REPLICATE)
    return float(np.abs(warped - cur).mean())


def _register(prev_low: np.ndarray, cur_low: np.ndarray, candidates: list[np.ndarray]) -> np.ndarray:
    """3x3 warp (current thumbnail -> previous thumbnail coordinates) that best aligns them:
    the better of ``candidates``, refined by ECC (falls back to that candidate if ECC fails)."""
    prev, cur = _gray(prev_low), _gray(cur_low)
    best = min(candidates, key=lambda w: _residual(prev, cur, w))
    warp = best[:2].astype(np.float32)
    try:
        _, warp = cv2.findTransformECC(cur, prev, warp, cv2.MOTION_AFFINE, ECC_CRITERIA, None, 1)
    except cv2.error:
        return best
    refined = np.vstack([warp.astype(np.float64), [0, 0, 1]])
    return refined if _residual(prev, cur, refined) <= _residual(prev, cur, best) else best
