"""Exact conversion between planar YUV and RGB for face regions.

swscale's fast YUV<->RGB paths are biased by about one code value (PyAV exposes no
accurate-rounding flag), which shows up as a darker, softer face after a round trip. Faces are
therefore cut from and pasted into the frame's own planes with the stream's matrix and range,
in float: chroma is repeated 2x on the way out and averaged 2x2 on the way back, so a face that
comes back unchanged leaves the planes unchanged up to interpolation.
"""

from __future__ import annotations

from dataclasses import dataclass

import av
import cv2
import numpy as np

# Planar YUV formats gpen-stream composites into: name -> (chroma shift x, chroma shift y, bits).
PLANAR_YUV = {
    "yuv420p": (1, 1, 8), "yuvj420p": (1, 1, 8), "yuv422p": (1, 0, 8), "yuvj422p": (1, 0, 8),
    "yuv444p": (0, 0, 8), "yuvj444p": (0, 0, 8),
    "yuv420p10le": (1, 1, 10), "yuv422p10le": (1, 0, 10), "yuv444p10le": (0, 0, 10),
}

# AVColorSpace -> (Kr, Kb). Unspecified and unknown values use BT.601, as swscale does.
_KR_KB = {1: (0.2126, 0.0722), 4: (0.30, 0.11), 5: (0.299, 0.114), 6: (0.299, 0.114), 7: (0.212, 0.087),
          9: (0.2627, 0.0593), 10: (0.2627, 0.0593)}
_FULL_RANGE = 2  # AVCOL_RANGE_JPEG


@dataclass(frozen=True)
class YUVLayout:
    """How a frame's planes encode RGB."""

    pix_fmt: str
    colorspace: int
    color_range: int

    def __post_init__(self):
        if self.pix_fmt not in PLANAR_YUV:
            raise ValueError(f"not a planar YUV format gpen-stream handles: {self.pix_fmt}")

    @property
    def shift(self) -> tuple[int, int]:
        return PLANAR_YUV[self.pix_fmt][:2]

    @property
    def bits(self) -> int:
        return PLANAR_YUV[self.pix_fmt][2]

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(np.uint8) if self.bits == 8 else np.dtype("<u2")

    @property
    def full_range(self) -> bool:
        return self.color_range == _FULL_RANGE or self.pix_fmt.startswith("yuvj")

    def _levels(self) -> tuple[float, float, float, float]:
        """(Y offset, Y span, C centre, C span) in code values."""
        k = float(1 << (self.bits - 8))
        if self.full_range:
            return 0.0, 255.0 * k, 128.0 * k, 255.0 * k
        return 16.0 * k, 219.0 * k, 128.0 * k, 224.0 * k

    def to_rgb(self, y: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
        """Planes (chroma at its own resolution) -> float32 RGB in 0..255 at luma resolution."""
        sx, sy = self.shift
        u = np.repeat(np.repeat(u, 1 << sy, axis=0), 1 << sx, axis=1)[:y.shape[0], :y.shape[1]]
        v = np.repeat(np.repeat(v, 1 << sy, axis=0), 1 << sx, axis=1)[:y.shape[0], :y.shape[1]]
        kr, kb = _KR_KB.get(self.colorspace, _KR_KB[5])
        y_off, y_span, c_mid, c_span = self._levels()
        luma = (y.astype(np.float32) - y_off) / y_span
        cb = (u.astype(np.float32) - c_mid) / c_span
        cr = (v.astype(np.float32) - c_mid) / c_span
        r = luma + 2 * (1 - kr) * cr
        b = luma + 2 * (1 - kb) * cb
        g = (luma - kr * r - kb * b) / (1 - kr - kb)
        return np.stack([r, g, b], axis=-1) * 255.0

    def from_rgb(self, rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Float or uint8 RGB (0..255, even size where subsampled) -> float32 planes."""
        kr, kb = _KR_KB.get(self.colorspace, _KR_KB[5])
        y_off, y_span, c_mid, c_span = self._levels()
        rgb = rgb.astype(np.float32) / 255.0
        luma = kr * rgb[..., 0] + (1 - kr - kb) * rgb[..., 1] + kb * rgb[..., 2]
        cb = (rgb[..., 2] - luma) / (2 * (1 - kb))
        cr = (rgb[..., 0] - luma) / (2 * (1 - kr))
        return y_off + y_span * luma, self.subsample(c_mid + c_span * cb), self.subsample(c_mid + c_span * cr)

    def subsample(self, full: np.ndarray) -> np.ndarray:
        """Average a luma-resolution array down to chroma resolution (exact 2x2 / 2x1 means)."""
        sx, sy = self.shift
        if (sx, sy) == (0, 0):
            return full
        h, w = full.shape[0] >> sy, full.shape[1] >> sx
        return cv2.resize(np.ascontiguousarray(full[:h << sy, :w << sx], dtype=np.float32), (w, h),
                          interpolation=cv2.INTER_AREA)


def plane(frame: av.VideoFrame, index: int, dtype: np.dtype) -> np.ndarray:
    """A (writable when the frame is) numpy view of one plane, without row padding."""
    p = frame.planes[index]
    rows = np.frombuffer(p, dtype=dtype).reshape(p.height, p.line_size // dtype.itemsize)
    return rows[:, :p.width]


def region_rgb(frame: av.VideoFrame, layout: YUVLayout, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
    """float32 RGB of the frame region [y0:y1, x0:x1] (coordinates on the chroma grid)."""
    sx, sy = layout.shift
    y = plane(frame, 0, layout.dtype)[y0:y1, x0:x1]
    u = plane(frame, 1, layout.dtype)[y0 >> sy:(y1 + (1 << sy) - 1) >> sy, x0 >> sx:(x1 + (1 << sx) - 1) >> sx]
    v = plane(frame, 2, layout.dtype)[y0 >> sy:(y1 + (1 << sy) - 1) >> sy, x0 >> sx:(x1 + (1 << sx) - 1) >> sx]
    return layout.to_rgb(y, u, v)


def copy_frame(frame: av.VideoFrame) -> av.VideoFrame:
    """A frame with its own pixels (PyAV's reformat() hands back the same frame when nothing
    changes): one that is stamped differently while the original is still queued elsewhere."""
    copy = av.VideoFrame(frame.width, frame.height, frame.format.name)
    for src, dst in zip(frame.planes, copy.planes):
        if src.line_size != dst.line_size or src.buffer_size != dst.buffer_size:
            return av.VideoFrame.from_ndarray(frame.to_ndarray(), format=frame.format.name)
        dst.update(src)
    copy.color_range, copy.colorspace = frame.color_range, frame.colorspace
    return copy
