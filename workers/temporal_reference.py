"""The temporal blender as it was before the tensor one (workers/temporal.py), kept as the
reference that one is measured against (tests, ``bench/temporal.py --blender reference``):
OpenCV, one crop at a time, ECC registration at the thumbnail's full 128x128, float16 state.
Workers do not use it.

The maths is the one workers/temporal.py describes; what differs is how it is computed: ECC
(``cv2.findTransformECC``) where the tensor blender runs coarse-to-fine Gauss-Newton on ECC's
criterion, and the state kept in float16. Bookkeeping (resets, frame gaps, holds, drops, the
memory cap) is the tensor blender's, inherited.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
import torch

from workers.temporal import (CHANGE_DILATE, LOWPASS_SIGMA, LOWPASS_SIZE, LOWPASS_TAPS, MAX_FRAME_GAP, OUTSIDE,
                              TemporalBlender)

ECC_CRITERIA = (cv2.TERM_CRITERIA_COUNT | cv2.TERM_CRITERIA_EPS, 40, 1e-4)
STATE_INTERP = cv2.INTER_CUBIC  # the recursive state is resampled every frame: keep it sharp


@dataclass
class _TrackState:
    frame: int
    affine: np.ndarray  # 3x3, frame -> crop
    output: np.ndarray  # S x S x 3 float16
    lowpass: np.ndarray  # LOWPASS_SIZE^2 x 3 float32, the input's thumbnail

    @property
    def nbytes(self) -> int:
        return self.output.nbytes + self.lowpass.nbytes


def _as3x3(affine) -> np.ndarray:
    m = np.eye(3)
    m[:2] = np.asarray(affine, dtype=np.float64)
    return m


def _thumbnail(crop: np.ndarray) -> np.ndarray:
    small = cv2.resize(crop.astype(np.float32), (LOWPASS_SIZE, LOWPASS_SIZE), interpolation=cv2.INTER_AREA)
    return cv2.GaussianBlur(small, (LOWPASS_TAPS, LOWPASS_TAPS), LOWPASS_SIGMA)


class ReferenceBlender(TemporalBlender):
    def blend_batch(self, keys, frames, affines, inputs: torch.Tensor, restored: torch.Tensor, resets,
                    run_dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """One crop after the other (host tensors)."""
        restored = restored.to(torch.uint8).numpy()
        return torch.from_numpy(np.stack([self._blend_one(*crop) for crop in zip(
            keys, frames, affines, inputs.numpy(), restored, resets)]))

    def _blend_one(self, key: tuple, frame: int, affine, input_crop: np.ndarray, restored: np.ndarray,
                   reset: bool) -> np.ndarray:
        a_cur = _as3x3(affine)
        lowpass = _thumbnail(input_crop)
        with self._lock:
            prev = None if reset else self._tracks.get(key)
        if prev is not None and not (0 < frame - prev.frame <= MAX_FRAME_GAP):
            prev = None
        out = restored.astype(np.float32)
        if prev is not None and self.blend_max > 0:
            out = self._blend_with(prev, a_cur, lowpass, out)
        with self._lock:
            if key in self._tracks:
                self._forget(key)
            state = _TrackState(frame, a_cur, out.astype(np.float16), lowpass)
            self._tracks[key] = state
            self._bytes += state.nbytes
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
                                  borderMode=cv2.BORDER_CONSTANT, borderValue=(OUTSIDE,) * 3)
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
