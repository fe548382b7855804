"""Per-track temporal state in a worker: restored faces that do not flicker.

GPEN restores each crop on its own, so small input changes (noise, compression, a pixel of
landmark jitter) give visibly different faces frame to frame. For each track we keep the
previous *output* crop and blend it into the new one, in aligned space:

1. Compensate motion. How the content moved between two crops depends on why the crops
   differ: if the landmarks tracked a moving face, the face sits still in crop space; if a
   still face's landmarks jittered, the content moved by the crops' relative affine
   A_prev o A_cur^-1 (both map frame pixels to crop pixels). We try both on low-passed
   thumbnails of the two *input* crops, keep the better, and refine it by image registration
   (Gauss-Newton on ECC's criterion, coarse to fine), so whatever mix of the two happened is
   undone.
2. Measure where the input really changed after that alignment: the remaining difference of
   the low-passed thumbnails. Low-passing removes per-frame noise, so what remains is
   expression, occlusion, lighting, or motion the affine could not explain.
3. Blend with a per-pixel weight w = blend_max * exp(-(change / blend_sigma)^2): where nothing
   changed the previous face carries on (a recursive average), where something changed the
   new face wins, so moving parts do not leave ghosts.

All of it runs on the device the crops are on, one call per model batch, and the state stays
there between frames. Warps are 3x3 matrices in normalised crop coordinates (-1 and 1 at the
crop's edges, grid_sample's ``align_corners=False``), so one matrix serves the thumbnails and
the full crop. Registration and the change map are batched tensor maths in float32 whatever
the model runs in (sums of squared gradients overflow float16). The full-size work (thumbnail,
warp of the previous output, blend) is batched torch on a GPU, in float16 where the model runs
in float16, and registration and change map replay there as one CUDA graph per batch size
(AlignGraphs: eagerly they are hundreds of small kernels a face). On a CPU the full-size work
goes crop by crop through our own numba kernels (workers.cpu_kernels: the thumbnail from the
uint8 crop, and OpenCV's bicubic warp fused with the blend, 1.1-3x OpenCV's speed depending on
the CPU and the motion), several times faster there than torch's batched maths, and the batch
is split over ``cpu_threads`` threads (the caller's and helpers'), torch on one thread in each:
by crops, or by bands of rows where the crops do not divide among the threads (a batch of one).
There the registration and change map are numba passes, sampling with our own bilinear
sampler (cpu_kernels.sample: up to 3x torch's grid_sample for 3 channels), one call per pyramid
level and one each for the scores and the change map: each numpy or torch call they replaced
held the GIL for microseconds that the other thread then waited for. A face whose Gauss-Newton
step moved it less than CONVERGED_PX takes no more steps at that level (a GPU masks the update
instead, with the same result). Thumbnails
are one tensor per crop, kept by the track states as they are and stacked by the thread that
registers them.

A track's state is dropped on ``reset`` (scene cut, new worker), when frames were skipped, on
``end_track``/``bye``, or, least recently used first, when all states together exceed
``max_bytes``.
"""

from __future__ import annotations

import functools
import math
import os
import threading
from collections import Counter, OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from workers import cpu_kernels
from workers.cpu_kernels import warp_blend

LOWPASS_SIZE = 128  # motion and change are measured on a 128x128 thumbnail of the crop
LOWPASS_TAPS, LOWPASS_SIGMA = 5, 1.0  # the thumbnail's Gaussian low-pass
MAX_FRAME_GAP = 2  # a track that skipped more frames than this starts afresh
CHANGE_DILATE = 3  # a moving edge also stops blending this many thumbnail pixels around it
OUTSIDE = -1e4  # the previous thumbnail's value where it does not cover the current crop
GRAY = (0.299, 0.587, 0.114)  # RGB -> luma, for registration
# registration: (thumbnail side, Gauss-Newton steps), coarse to fine. The full thumbnail must be
# last: stopping at 64 moved bench/temporal.py's PSNR and TE by up to 0.07. One step there
# instead of two (~0.4 ms of CPU per face less) moved the bench by 0.01 at most, but the
# occluder clip's TE by 0.11 against the replaced blender in tests/test_temporal_tensor.py
REGISTER_LEVELS = ((LOWPASS_SIZE // 4, 1), (LOWPASS_SIZE // 2, 1), (LOWPASS_SIZE, 2))
DAMPING = 1e-6  # added to the normal matrix's diagonal, relative and absolute: flat images solve to 0
MIN_GAIN = 0.1  # below this the two thumbnails barely correlate: bound the step (it is checked anyway)
# a face whose Gauss-Newton step moved its thumbnail's corners less than this (pixels of the full
# thumbnail) takes no more steps at that level: on bench/worker.py's faces the first step at 128 px
# moved them 0.03-0.09 px and the second, where it ran anyway, 0.003-0.012
CONVERGED_PX = 0.1
MAX_GRAPHED = 32  # on a GPU, batches of up to this many registrations run as CUDA graphs (one per size);
# beyond it the eager ops' launches are spread over enough faces


@dataclass
class _TrackState:
    frame: int
    affine: np.ndarray  # 3x3 float64, frame -> crop pixels
    output: torch.Tensor  # S x S x 3, the blended output before rounding
    lowpass: torch.Tensor  # 3 x LOWPASS_SIZE x LOWPASS_SIZE float32, the input's thumbnail

    @property
    def nbytes(self) -> int:
        return self.output.nbytes + self.lowpass.nbytes


def blend_dtype(device: torch.device, run_dtype: torch.dtype) -> torch.dtype:
    """float16 where a GPU runs the model in float16 (steps of 1/8 at most over 0..255), else
    float32: bfloat16's 8-bit mantissa would stall a recursive average, CPUs lack fast float16."""
    return torch.float16 if device.type == "cuda" and run_dtype == torch.float16 else torch.float32


def _as3x3(affine) -> np.ndarray:
    m = np.eye(3)
    m[:2] = np.asarray(affine, dtype=np.float64)[:2]
    return m


def _normalise(size: int) -> np.ndarray:
    """Pixel coordinates (centres at 0..size-1) -> normalised ones (-1 and 1 at the edges)."""
    return np.array([[2 / size, 0, 1 / size - 1], [0, 2 / size, 1 / size - 1], [0, 0, 1]])


@functools.cache
def _normalising(size: int) -> tuple[np.ndarray, np.ndarray]:
    """_normalise(size) and its inverse, computed once per size (read-only)."""
    n = _normalise(size)
    pair = (n, np.linalg.inv(n))
    for matrix in pair:
        matrix.flags.writeable = False
    return pair


def _to_pixels(theta: np.ndarray, size: int) -> np.ndarray:
    """A normalised warp as the 2x3 pixel matrix OpenCV takes."""
    n, to_pixels = _normalising(size)
    return (to_pixels @ theta @ n)[:2]


# ------------------------------------------------------------------------------ thumbnails


def _gaussian_taps() -> np.ndarray:
    x = np.arange(LOWPASS_TAPS) - LOWPASS_TAPS // 2
    taps = np.exp(-x**2 / (2 * LOWPASS_SIGMA**2))
    return taps / taps.sum()


def thumbnails(crops: torch.Tensor, opencv: bool) -> torch.Tensor:
    """N x S x S x 3 crops -> N x 3 x LOWPASS_SIZE^2 float32: area-averaged, then Gaussian
    low-passed, mirrored at the edges. ``opencv``: crop by crop (CPU tensors only)."""
    return torch.stack(_thumbnail_each(crops)) if opencv else _thumbnails_torch(crops)


def _thumbnail_each(crops: torch.Tensor) -> list[torch.Tensor]:
    """thumbnails(crops, opencv=True) as one 3 x L x L tensor per crop, each its own memory: a
    track's state keeps its crop's, and a batch is stacked only where it is registered (in the
    thread that registers it). GPEN's crop sizes go through one numba pass
    (workers.cpu_kernels.thumbnail, 2.5-3x OpenCV's speed), others through OpenCV."""
    side = (LOWPASS_SIZE, LOWPASS_SIZE)
    small = []
    taps = _gaussian_taps().astype(np.float32)
    for crop in crops.numpy():
        if crop.dtype == np.uint8 and cpu_kernels.thumbnail_fits(crop.shape, LOWPASS_SIZE):  # GPEN's crop sizes
            small.append(torch.from_numpy(cpu_kernels.thumbnail(crop, LOWPASS_SIZE, taps)))
            continue
        as_float = _scratch("crop", crop.shape, np.float32)
        np.copyto(as_float, crop)
        small_shape = side + crop.shape[2:]
        area, blurred = _scratch("area", small_shape, np.float32), _scratch("blurred", small_shape, np.float32)
        cv2.resize(as_float, side, dst=area, interpolation=cv2.INTER_AREA)
        cv2.GaussianBlur(area, (LOWPASS_TAPS, LOWPASS_TAPS), LOWPASS_SIGMA, dst=blurred)
        planes = np.empty((crop.shape[2],) + side, np.float32)
        cv2.split(blurred, list(planes))  # to channels first, into the planes' memory
        small.append(torch.from_numpy(planes))
    return small


_thread_scratch = threading.local()


def _scratch(name: str, shape: tuple, dtype) -> np.ndarray:
    """A work array of this thread's, reused from call to call. A fresh array of a crop's size
    is fresh pages from the kernel each time: at 512 px that was ~350 page faults and ~2 ms of
    system time per face, more than the maths around the warp."""
    arrays = _thread_scratch.__dict__
    array = arrays.get(name)
    if array is None or array.shape != tuple(shape) or array.dtype != dtype:
        array = arrays[name] = np.empty(shape, dtype)
    return array


def _stacked(name: str, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """torch.stack(tensors) into this thread's work array ``name`` (see _scratch): valid until
    the thread's next call with that name."""
    first = tensors[0]
    out = torch.from_numpy(_scratch(name, (len(tensors), *first.shape), np.float32))
    return torch.stack(list(tensors), out=out)


@functools.cache
def _constant(values: tuple, device: torch.device) -> torch.Tensor:
    """A small float32 constant on ``device``, copied there once (a copy per call would make
    the host wait for the GPU each time; read only; kept for good: CUDA graphs hold its address)."""
    return to_device(torch.tensor(values, dtype=torch.float32), device)


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``tensor`` (on the host, or there already) on ``device``, the copy queued on the current stream: to a GPU
    through pinned memory, since a copy from pageable memory can make the host wait for the
    stream's queued work first."""
    if device.type != "cuda" or tensor.is_cuda:
        return tensor.to(device)  # a no-op where it is already
    return tensor.pin_memory().to(device, non_blocking=True)


def _rows(indices: Sequence[int], device: torch.device) -> slice | torch.Tensor:
    """An index for ``indices`` along the first dimension: a slice where they are consecutive
    (a view), else an index tensor on ``device`` (a Python list would be copied there and
    waited for at each use)."""
    if len(indices) and list(indices) == list(range(indices[0], indices[0] + len(indices))):
        return slice(indices[0], indices[0] + len(indices))
    return to_device(torch.tensor(indices, dtype=torch.long), device)


def _thumbnails_torch(crops: torch.Tensor) -> torch.Tensor:
    x = F.interpolate(crops.permute(0, 3, 1, 2).float(), size=(LOWPASS_SIZE, LOWPASS_SIZE), mode="area")
    taps = _constant(tuple(_gaussian_taps().tolist()), crops.device)
    pad = LOWPASS_TAPS // 2
    x = F.conv2d(F.pad(x, (pad, pad, 0, 0), mode="reflect"), taps.view(1, 1, 1, -1).expand(3, 1, 1, -1), groups=3)
    return F.conv2d(F.pad(x, (0, 0, pad, pad), mode="reflect"), taps.view(1, 1, -1, 1).expand(3, 1, -1, 1), groups=3)


# ---------------------------------------------------------------------------- registration


def _kernels(tensor: torch.Tensor, kernels: bool) -> bool:
    """Whether to run workers.cpu_kernels on this tensor: asked for, and a CPU tensor (False
    runs on a CPU exactly what a GPU runs, for comparing the two)."""
    return kernels and tensor.device.type == "cpu"


def _gray(thumbs: torch.Tensor, kernels: bool) -> torch.Tensor:
    if _kernels(thumbs, kernels):  # one numba pass instead of two torch ones
        return torch.from_numpy(cpu_kernels.gray(thumbs.contiguous().numpy(), np.array(GRAY)))
    return (thumbs * _constant(GRAY, thumbs.device).view(1, 3, 1, 1)).sum(dim=1, keepdim=True)


@functools.cache
def _centres(side: int, device: torch.device) -> torch.Tensor:
    """Normalised coordinates of the pixel centres along one axis (cached: a registration asks
    ten times per batch, and a batch of one face felt each torch op; read only; kept for good:
    CUDA graphs hold its address)."""
    return (torch.arange(side, dtype=torch.float32, device=device) * 2 + 1) / side - 1


def _sources(theta: torch.Tensor, side: int, kernels: bool = True) -> torch.Tensor:
    """N x 2 x side x side: where each pixel's x and y come from under warps theta (N x 3 x 3).
    On a CPU one numba pass: torch's broadcast sum of a row and a column takes ~10x as long
    there, and a matrix product with the pixels' (x, y, 1) ~3x. On a GPU that sum: a matrix
    product there may run in TF32 (torch.set_float32_matmul_precision), whose 10-bit mantissa
    would misplace samples by up to a pixel at 2048 px."""
    if _kernels(theta, kernels):
        return torch.from_numpy(cpu_kernels.sources(theta.numpy(), _centres(side, theta.device).numpy()))
    return _sources_summed(theta, side)


def _sources_summed(theta: torch.Tensor, side: int) -> torch.Tensor:
    c = _centres(side, theta.device)
    x, y = c.view(1, 1, 1, side), c.view(1, 1, side, 1)
    t = theta[:, :2, :, None, None]
    return x * t[:, :, 0] + y * t[:, :, 1] + t[:, :, 2]


def _grid(theta: torch.Tensor, side: int, kernels: bool) -> torch.Tensor:
    """grid_sample's N x side x side x 2 sampling grid for warps theta: a view of the planes,
    which on a CPU are many times faster to build than (x, y) pairs."""
    return _sources(theta, side, kernels).permute(0, 2, 3, 1)


def _sample(images: torch.Tensor, theta: torch.Tensor, padding: str, kernels: bool) -> torch.Tensor:
    """images (N x C x side^2) at theta(x) for every pixel x, bilinear."""
    if _kernels(images, kernels):
        return torch.from_numpy(cpu_kernels.sample(images.numpy(), theta.numpy(), padding == "border"))
    return F.grid_sample(images, _grid(theta, images.shape[-1], kernels), mode="bilinear", padding_mode=padding,
                         align_corners=False)


def _residual(prev: torch.Tensor, cur: torch.Tensor, theta: torch.Tensor, kernels: bool) -> torch.Tensor:
    """Per pair, mean |prev(theta(x)) - cur(x)|, the border repeated."""
    if _kernels(prev, kernels):  # one numba pass instead of four torch ones
        return torch.from_numpy(cpu_kernels.residual(prev.numpy(), cur.numpy(), theta.numpy()))
    return (_sample(prev, theta, "border", kernels) - cur).abs().mean(dim=(1, 2, 3))


def _gauss_newton(theta: torch.Tensor, prev: torch.Tensor, cur: torch.Tensor, steps: int) -> torch.Tensor:
    """Refine warps theta so that gain * prev(theta(x)) + bias ~ cur(x) in the least-squares
    sense over the pixels that land inside prev; with the best gain and bias that is ECC's
    criterion, the correlation coefficient. Forward compositional Gauss-Newton: with W the
    warped prev and J its gradient times the coordinates (dW / d step), each step solves
        gain * (W + J @ step) + bias = cur
    linearly for (gain * step, gain, bias), then theta <- theta o (I + step). The torch ops a
    GPU runs (a CPU runs cpu_kernels.gauss_newton)."""
    n, _, side, _ = cur.shape
    c = _centres(side, cur.device)
    columns = torch.empty((n, 9, side, side), device=cur.device)
    columns[:, 8:] = cur
    identity = torch.eye(3, device=cur.device)
    moving = None  # the faces still taking steps at this level (no host sync: a mask, not an index)
    for _ in range(steps):
        sources = _sources_summed(theta, side)
        warped = F.grid_sample(prev, sources.permute(0, 2, 3, 1), mode="bilinear", padding_mode="border",
                               align_corners=False)
        normal = _normal_equations(warped, sources, c, columns)
        lhs, rhs = normal[..., :8], normal[..., 8:]
        lhs.diagonal(dim1=1, dim2=2).mul_(1 + DAMPING).add_(DAMPING)
        solution = torch.linalg.solve_ex(lhs, rhs).result  # solve() would check for errors: a GPU sync
        step = solution[:, :6] / solution[:, 6:7].clamp(min=MIN_GAIN) * (4 / side)
        stepped = theta @ (identity + F.pad(step.view(n, 2, 3), (0, 0, 0, 1)))
        still = corners_moved(stepped, theta) >= CONVERGED_PX * 2 / LOWPASS_SIZE
        theta = stepped if moving is None else torch.where(moving.view(n, 1, 1), stepped, theta)
        moving = still if moving is None else moving & still
    return theta


def corners_moved(after: torch.Tensor, before: torch.Tensor) -> torch.Tensor:
    """How far warps ``before`` -> ``after`` (N x 3 x 3, normalised) moved the image's corners
    (+-1, +-1), at most, along either axis, in normalised units: per row |a| + |b| + |c|."""
    return (after - before)[:, :2].abs().sum(dim=2).amax(dim=1)


def _gauss_newton_on_cpu(theta: np.ndarray, prev: np.ndarray, cur: np.ndarray, steps: int) -> np.ndarray:
    """_gauss_newton on a CPU (float32 arrays): the same steps, all of a level's in one numba
    pass (workers.cpu_kernels.gauss_newton), face by face. A warp gone NaN or infinite passes
    silently, as on torch's path: register keeps the start there."""
    side = cur.shape[-1]
    return cpu_kernels.gauss_newton(theta, prev, cur, steps, _centres(side, torch.device("cpu")).numpy(), DAMPING,
                                    MIN_GAIN, 4 / side, CONVERGED_PX * 2 / LOWPASS_SIZE)


def _normal_equations(warped: torch.Tensor, sources: torch.Tensor, c: torch.Tensor, columns: torch.Tensor
                      ) -> torch.Tensor:
    """N x 8 x 9: the normal equations, right side last, with torch. The least-squares system's
    columns are written in place into ``columns`` (N x 9 x S x S, cur already in the last): J
    (6), W (for the gain), 1 (the bias), and cur, over the pixels inside prev. J holds the
    central differences unscaled, pixel[x+1] - pixel[x-1]: twice the slope per pixel, side / 4
    times the slope per normalised unit, by which the step is divided at the end instead of
    scaling every pixel."""
    n, side = columns.shape[0], columns.shape[-1]
    u, v = c.view(1, 1, 1, side), c.view(1, 1, side, 1)
    gx, gy = columns[:, 2:3], columns[:, 5:6]
    inside = (sources.abs().amax(dim=1, keepdim=True) <= 1).float()  # only these pixels count
    padded = F.pad(warped, (1, 1, 1, 1), mode="replicate")
    torch.sub(padded[:, :, 1:-1, 2:], padded[:, :, 1:-1, :-2], out=gx).mul_(inside)
    torch.sub(padded[:, :, 2:, 1:-1], padded[:, :, :-2, 1:-1], out=gy).mul_(inside)
    torch.mul(gx, u, out=columns[:, 0:1])
    torch.mul(gx, v, out=columns[:, 1:2])
    torch.mul(gy, u, out=columns[:, 3:4])
    torch.mul(gy, v, out=columns[:, 4:5])
    torch.mul(warped, inside, out=columns[:, 6:7])
    columns[:, 7:8] = inside
    flat = columns.view(n, 9, side * side)
    return flat[:, :8] @ flat.transpose(1, 2)


def _halve(images: torch.Tensor) -> torch.Tensor:
    """2x2 means (avg_pool2d(images, 2) as sums of strided views: ~5x faster on a CPU)."""
    rows = images[..., 0::2, :] + images[..., 1::2, :]
    return (rows[..., 0::2] + rows[..., 1::2]) * 0.25


def register(prev: torch.Tensor, cur: torch.Tensor, starts: torch.Tensor, *, kernels: bool = True) -> torch.Tensor:
    """N x 3 x 3 warps (current -> previous thumbnail, normalised) aligning N pairs of
    thumbnails (N x 3 x L x L, float32): the better of K ``starts`` (N x K x 3 x 3), refined,
    unless refining made the alignment worse. ``kernels``: on a CPU, through workers.cpu_kernels
    where they do the same, the small solves too, and the identity start's residual without
    sampling (False: the torch ops a GPU runs)."""
    n, k = starts.shape[:2]
    prev, cur = _gray(prev, kernels), _gray(cur, kernels)
    on_cpu = _kernels(prev, kernels)
    side = prev.shape[-1]
    if on_cpu and k == 2 and side & (side - 1) == 0 and bool((starts[:, 0] == torch.eye(3)).all()):
        # the first start is the identity (as blend_batch asks): at a power-of-two side pixel
        # centres map exactly onto pixels, so sampling prev there gives prev, bit for bit
        scores = torch.stack([torch.from_numpy(cpu_kernels.mean_abs_difference(prev.numpy(), cur.numpy())),
                              _residual(prev, cur, starts[:, 1], kernels)], dim=1)
    else:
        def each_start(images: torch.Tensor) -> torch.Tensor:  # N*K, each image K times
            return images.unsqueeze(1).expand(n, k, *images.shape[1:]).flatten(0, 1)

        scores = _residual(each_start(prev), each_start(cur), starts.flatten(0, 1), kernels).view(n, k)
    # a start that is not finite never wins (numba's sampling gives NaN there, torch's with the
    # border repeated a corner's value)
    finite = torch.isfinite(starts).flatten(2).all(dim=2)
    start_score, best = torch.where(finite, scores, torch.inf).min(dim=1)
    start = starts[torch.arange(n, device=starts.device), best]
    theta = start
    if on_cpu:  # each thumbnail's pyramid in one numba pass per level
        pyramid = {LOWPASS_SIZE: (prev.numpy(), cur.numpy())}
        while min(pyramid) > REGISTER_LEVELS[0][0]:
            pyramid[min(pyramid) // 2] = tuple(cpu_kernels.halve(images) for images in pyramid[min(pyramid)])
        host = theta.numpy()
        for level, steps in REGISTER_LEVELS:
            host = _gauss_newton_on_cpu(host, *pyramid[level], steps)
        theta = torch.from_numpy(host)
    else:
        pyramid = {LOWPASS_SIZE: torch.cat([prev, cur])}  # both thumbnails, pooled together
        while min(pyramid) > REGISTER_LEVELS[0][0]:
            pyramid[min(pyramid) // 2] = _halve(pyramid[min(pyramid)])
        for level, steps in REGISTER_LEVELS:
            theta = _gauss_newton(theta, *pyramid[level].split(n), steps)
    better = (_residual(prev, cur, theta, kernels) <= start_score) & torch.isfinite(theta).flatten(1).all(dim=1)
    return torch.where(better.view(n, 1, 1), theta, start)


# ------------------------------------------------------------------------------ change map


def _dilate(images: torch.Tensor, size: int) -> torch.Tensor:
    """Maximum over a size x size window (max_pool2d with stride 1 as separable maxima of
    shifted views: several times faster on a CPU)."""
    pad = size // 2
    x = F.pad(images, (pad, pad, pad, pad), value=float("-inf"))
    h, w = images.shape[-2:]
    rows = x[..., :, :w]
    for k in range(1, size):
        rows = torch.maximum(rows, x[..., :, k:k + w])
    out = rows[..., :h, :]
    for k in range(1, size):
        out = torch.maximum(out, rows[..., k:k + h, :])
    return out


def change_weight(prev: torch.Tensor, cur: torch.Tensor, theta: torch.Tensor, blend_max: float,
                  blend_sigma: float, *, kernels: bool = True) -> torch.Tensor:
    """N x 1 x L x L weight of the previous output, from the thumbnails aligned by theta
    (``kernels`` as in register)."""
    if _kernels(prev, kernels):  # up to the exponential in one numba pass instead of ~12 torch ops, the
        # coverage worked out from the positions there rather than sampled as a fourth channel
        exponent = cpu_kernels.change_exponent_at(prev.numpy(), cur.contiguous().numpy(), theta.numpy(),
                                                  _centres(prev.shape[-1], prev.device).numpy(), OUTSIDE, blend_sigma,
                                                  CHANGE_DILATE)
        return torch.from_numpy(exponent).exp_().mul_(blend_max)
    covered = torch.ones_like(prev[:, :1])
    warped = _sample(torch.cat([prev, covered], dim=1), theta, "zeros", kernels)
    return _change_weight_torch(warped, cur, blend_max, blend_sigma)


def _change_weight_torch(warped: torch.Tensor, cur: torch.Tensor, blend_max: float, blend_sigma: float) -> torch.Tensor:
    """The weight from the previous thumbnails warped with a coverage channel last."""
    # bilinear taps outside the old crop count as OUTSIDE: a huge change, so no blending there
    aligned = warped[:, :3] + OUTSIDE * (1 - warped[:, 3:])
    change = (cur - aligned).abs().mean(dim=1, keepdim=True) / 255
    change = _dilate(change, CHANGE_DILATE)
    return blend_max * torch.exp(-torch.square(change / blend_sigma))


# ------------------------------------------------------------------------ full-size blend


def _blend_on_cpu(previous: np.ndarray, theta: np.ndarray, weight: np.ndarray, restored: np.ndarray,
                  rounded: np.ndarray, out: np.ndarray | None = None, rows: tuple[int, int] | None = None
                  ) -> np.ndarray:
    """One crop: the previous output (S x S x 3 float32) warped by theta (bicubic, the border
    repeated), blended into ``restored`` with ``weight`` (L x L) upsampled bilinearly. Writes
    the uint8 result (rounded to nearest, ties to even, saturated) into ``rounded`` and the
    float32 one into ``out`` (or a new array), and returns the float32 one. One pass of our
    numba kernel (workers.cpu_kernels); no torch ops: they would wake torch's OpenMP threads,
    which then spin against the helpers. ``rows``: only those (top, bottom) of the outputs."""
    return warp_blend(previous, _to_pixels(theta, previous.shape[0]), weight, restored, rounded, out, rows)


def _blend_batched(previous: torch.Tensor, theta: torch.Tensor, weight: torch.Tensor, restored: torch.Tensor,
                   dtype: torch.dtype) -> torch.Tensor:
    """The same for N crops at once with torch (N x S x S x 3 in and out, ``dtype`` out). The
    warp runs in float32: a float16 grid would place samples only to ~1/8 pixel at 512."""
    size = previous.shape[1]
    warped = F.grid_sample(previous.permute(0, 3, 1, 2).float(), _grid(theta, size, False), mode="bicubic",
                           padding_mode="border", align_corners=False)
    weight = F.interpolate(weight, size=(size, size), mode="bilinear", align_corners=False)
    blended = torch.lerp(restored.permute(0, 3, 1, 2).to(dtype), warped.to(dtype), weight.to(dtype))
    return blended.permute(0, 2, 3, 1)


class AlignGraphs:
    """On a GPU, ``align`` (registration and change map of N thumbnail pairs) as one CUDA graph
    per N, replayed: eagerly a batch of one face launched ~260 kernels through ~1100 torch ops,
    5 ms of the host's time for 0.5 ms of the GPU's (an H200, bench/worker.py --profile), time a
    worker's model thread then waited for (the GIL).

    Capturing synchronises the device and empties torch's cache of freed blocks, and no other
    thread may empty it meanwhile (a model unloading, an out-of-memory retry), so a worker
    captures every N it can meet before it serves (``prepare``); outside a worker the first
    call of an N captures it. A failed capture can leave torch's allocator in a state it does
    not recover from, so it is an error, not a silent fallback: worker.cuda_graphs: false runs
    the eager ops instead. The graphs of a device share one memory pool (they replay one at a
    time, on one thread, and their outputs are copied out at once)."""

    def __init__(self, align: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]):
        self._align = align  # (prev, cur, starts) -> (theta, weight); fixed shapes for a given N
        self._graphs: dict[tuple, tuple] = {}  # (device, N) -> (static inputs, static outputs, graph)
        self._pools: dict[torch.device, tuple] = {}  # device -> its graphs' memory pool

    def __len__(self) -> int:
        return len(self._graphs)

    def prepare(self, device: torch.device, most: int) -> None:
        """Capture the graphs for 1..``most`` pairs on ``device`` now (a no-op off a GPU)."""
        if device.type != "cuda":
            return
        device = _indexed(device)
        with torch.cuda.device(device):
            for n in range(1, min(most, MAX_GRAPHED) + 1):
                if (device, n) not in self._graphs:
                    thumbs = torch.zeros((n, 3, LOWPASS_SIZE, LOWPASS_SIZE), device=device)
                    self._graphs[(device, n)] = self._capture(thumbs, thumbs, torch.eye(3, device=device).expand(n, 2, 3, 3))

    def __call__(self, prev: torch.Tensor, cur: torch.Tensor, starts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        device, n = prev.device, prev.shape[0]
        if device.type != "cuda" or n > MAX_GRAPHED:
            return self._align(prev, cur, starts)
        entry = self._graphs.get((device, n))
        if entry is None:
            with torch.cuda.device(device):
                entry = self._graphs[(device, n)] = self._capture(prev, cur, starts)
        inputs, outputs, graph = entry
        for static, given in zip(inputs, (prev, cur, starts)):
            static.copy_(given)
        graph.replay()
        return tuple(t.clone() for t in outputs)  # the next replay overwrites the static outputs

    def _capture(self, prev: torch.Tensor, cur: torch.Tensor, starts: torch.Tensor) -> tuple:
        device = prev.device
        inputs = tuple(t.clone() for t in (prev, cur, starts))
        # two eager runs on a side stream first, as torch asks: libraries set up their handles
        # and workspaces, and the cached constants are made, outside the capture
        here, side = torch.cuda.current_stream(device), torch.cuda.Stream(device)
        side.wait_stream(here)
        with torch.cuda.stream(side):
            for _ in range(2):
                self._align(*inputs)
        here.wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        if device not in self._pools:
            self._pools[device] = torch.cuda.graph_pool_handle()
        pool = self._pools[device]
        try:
            # on our own stream, on the inputs' device (torch's default capture stream is made
            # once, on whichever device came first); thread-local: other threads' work goes on
            with torch.cuda.graph(graph, pool=pool, stream=side, capture_error_mode="thread_local"):
                outputs = self._align(*inputs)
        except RuntimeError as exc:
            raise RuntimeError(f"capturing the temporal blend's CUDA graph for {len(prev)} faces on {device} failed "
                               f"({exc}); set worker.cuda_graphs: false to blend without CUDA graphs") from exc
        return inputs, outputs, graph


def _indexed(device: torch.device) -> torch.device:
    """cuda -> cuda:<current device>, as tensors name their device."""
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def _one_torch_thread() -> None:
    """A blend helper thread's initializer: torch runs this thread's CPU work on the thread
    itself (the helpers already split the batch; OpenMP threads inside each small op would only
    wait for each other). A thread takes its count from the process-wide default on first use,
    and setting it sets that default too: a thread that ends at once puts the default back."""
    default = torch.get_num_threads()
    torch.set_num_threads(1)
    restore = threading.Thread(target=torch.set_num_threads, args=(default,))
    restore.start()
    restore.join()


class TemporalBlender:
    """The states of all tracks a worker serves. A worker's receiving thread drops and holds
    tracks while its model thread blends: the state table is locked, the maths is not."""

    def __init__(self, blend_max: float, blend_sigma: float, max_bytes: int = 1 << 30, *, opencv_on_cpu: bool = True,
                 cpu_threads: int = min(2, os.cpu_count() or 1), cuda_graphs: bool = True):
        self.blend_max = blend_max
        self.blend_sigma = blend_sigma
        # on a GPU registration and change map run as CUDA graphs (False: the eager torch ops)
        self._aligned = AlignGraphs(self._align) if cuda_graphs else self._align
        self.max_bytes = max_bytes
        # on a CPU the full-size work goes crop by crop through OpenCV; False runs there what a
        # GPU runs, batched torch (slower on a CPU: for comparing the two)
        self.opencv_on_cpu = opencv_on_cpu
        # on a CPU (with opencv_on_cpu) a batch's crops are split over the calling thread and
        # cpu_threads - 1 helpers (OpenCV and torch release the GIL), each running torch on one
        # thread as the worker's blend thread, the caller, does
        self.cpu_threads = max(1, cpu_threads)
        self._helpers = ThreadPoolExecutor(self.cpu_threads - 1, thread_name_prefix="blend-helper",
                                           initializer=_one_torch_thread) if self.cpu_threads > 1 else None
        self._tracks: OrderedDict[tuple, _TrackState] = OrderedDict()
        self._bytes = 0
        self._held: Counter[tuple] = Counter()  # tracks with crops in the model: see hold()
        self._deferred: list[tuple] = []  # drops waiting for a release()
        self._spares: list[torch.Tensor] = []  # replaced states' outputs, for new states to reuse (on a CPU)
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._tracks)

    def _split(self, work: Callable[[slice], object], n: int, parallel: bool) -> list:
        """work(part) for consecutive parts of range(n), one per thread when ``parallel`` (the
        first in the calling thread, the others on the helpers), else one part; the results in order."""
        threads = max(1, min(self.cpu_threads, n)) if parallel else 1
        parts = [slice(k * n // threads, (k + 1) * n // threads) for k in range(threads)]
        helped = [self._helpers.submit(work, part) for part in parts[1:]]
        try:
            mine = work(parts[0])
        finally:  # the helpers' parts end before anything else happens, even on an error here
            results = [f.result() for f in helped]
        return [mine, *results]

    def _align(self, prev: torch.Tensor, cur: torch.Tensor, starts: torch.Tensor, kernels: bool = False
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Warps (register) and the previous outputs' weights (change_weight) for pairs of thumbnails."""
        theta = register(prev, cur, starts, kernels=kernels)
        return theta, change_weight(prev, cur, theta, self.blend_max, self.blend_sigma, kernels=kernels)

    def prepare(self, device: torch.device, batch: int) -> None:
        """Before serving on ``device`` with batches of up to ``batch`` crops: on a GPU capture
        the CUDA graphs those batches can need (see AlignGraphs); elsewhere nothing."""
        if isinstance(self._aligned, AlignGraphs):
            self._aligned.prepare(device, batch)

    def hold(self, keys: Sequence[tuple]) -> None:
        """Tracks whose crops are in the model: dropping them (end of track, bye) waits for
        release(), so those crops still blend with their previous output, as they would had
        the drop come after them."""
        with self._lock:
            self._held.update(keys)

    def release(self, keys: Sequence[tuple]) -> None:
        """Those crops are done: the drops that waited for them happen now."""
        with self._lock:
            self._held.subtract(keys)
            self._held = +self._held  # forget the zero counts
            deferred, self._deferred = self._deferred, []
            for prefix in deferred:
                self._drop(prefix)

    def drop(self, key_prefix: tuple) -> None:
        """Forget every track whose key starts with ``key_prefix``."""
        with self._lock:
            self._drop(key_prefix)

    def _drop(self, key_prefix: tuple) -> None:
        n = len(key_prefix)
        if any(key[:n] == key_prefix for key in self._held):
            self._deferred.append(key_prefix)
        for key in [k for k in self._tracks if k[:n] == key_prefix and k not in self._held]:
            self._forget(key)
        if not self._tracks:
            self._spares.clear()  # nothing left to replace: the memory kept for that goes too

    def _forget(self, key: tuple) -> None:
        self._bytes -= self._tracks.pop(key).nbytes

    def blend(self, key: tuple, frame: int, affine, input_crop: np.ndarray, restored: np.ndarray,
              *, reset: bool = False) -> np.ndarray:
        """The temporally stable output for one crop (uint8, same shape as ``restored``)."""
        out = self.blend_batch([key], [frame], [affine], torch.from_numpy(input_crop[None]),
                               torch.from_numpy(restored[None]), [reset])
        return out[0].numpy()

    def blend_batch(self, keys: Sequence[tuple], frames: Sequence[int], affines: Sequence, inputs: torch.Tensor,
                    restored: torch.Tensor, resets: Sequence[bool], run_dtype: torch.dtype = torch.float32
                    ) -> torch.Tensor:
        """The temporally stable outputs of a batch of crops: N x S x S x 3 uint8, on the crops'
        device. ``inputs`` are the model's uint8 input crops, ``restored`` its outputs (uint8, or
        ``run_dtype`` holding whole numbers in 0..255), both N x S x S x 3 on one device. Crops
        are taken in order: a track may have consecutive frames in one batch."""
        n, size = len(keys), inputs.shape[1]
        device = inputs.device
        dtype = blend_dtype(device, run_dtype)
        per_crop = device.type == "cpu" and self.opencv_on_cpu
        affine = [_as3x3(a) for a in affines]
        if per_crop:  # one tensor per crop, made on the threads (see _thumbnail_each)
            lowpass = [low for part in self._split(lambda part: _thumbnail_each(inputs[part]), n, True) for low in part]
        else:
            lowpass = thumbnails(inputs, opencv=False)

        # each crop's predecessor: an earlier crop of its track in this batch (its index), the
        # stored state, or None (first frame, reset, frames skipped, blending off)
        latest: dict[tuple, int | _TrackState] = {}
        prev_of: list[int | _TrackState | None] = []
        with self._lock:
            stored = {key: self._tracks.get(key) for key in keys}
        for i, key in enumerate(keys):
            prev = None if resets[i] or self.blend_max <= 0 else latest.get(key, stored[key])
            if isinstance(prev, _TrackState) and prev.output.shape[0] != size:
                prev = None  # the track's crops changed size (another model): start afresh
            prev_frame = frames[prev] if isinstance(prev, int) else prev.frame if prev is not None else None
            prev_of.append(prev if prev is not None and 0 < frames[i] - prev_frame <= MAX_FRAME_GAP else None)
            latest[key] = i

        # register every crop that has a predecessor with it, all at once: that needs inputs only
        linked = [i for i in range(n) if prev_of[i] is not None]
        if linked:
            to_norm, from_norm = _normalising(size)
            prev_affine = np.array([affine[p] if isinstance(p := prev_of[i], int) else p.affine for i in linked])
            relative = to_norm @ prev_affine @ np.linalg.inv(np.array([affine[i] for i in linked])) @ from_norm
            starts = np.stack([np.broadcast_to(np.eye(3), relative.shape), relative], axis=1)  # identity and relative
            starts = to_device(torch.as_tensor(starts, dtype=torch.float32), device)
            prev_low = [lowpass[p] if isinstance(p := prev_of[i], int) else p.lowpass for i in linked]

            if per_crop:  # split over the threads, each stacking its own part's thumbnails
                cur_low = [lowpass[i] for i in linked]

                def align(part: slice) -> tuple[torch.Tensor, torch.Tensor]:
                    return self._align(_stacked("prev", prev_low[part]), _stacked("cur", cur_low[part]), starts[part],
                                       kernels=True)

                theta, weight = (torch.cat(parts) for parts in zip(*self._split(align, len(linked), True)))
            else:
                theta, weight = self._aligned(torch.stack(prev_low), lowpass[_rows(linked, device)], starts)
            row = {i: j for j, i in enumerate(linked)}
            if per_crop:
                theta_host, weight_host = theta.double().numpy(), weight.numpy()

        # blend in rounds: a crop whose predecessor is in this batch waits for that one's output
        rounded = torch.empty((n, size, size, 3), dtype=torch.uint8, device=device)
        outputs: list[torch.Tensor | None] = [None] * n
        depth = [0] * n
        for i, p in enumerate(prev_of):  # predecessors come first, so one pass settles the depths
            if isinstance(p, int):
                depth[i] = depth[p] + 1
        for level in range(max(depth) + 1):
            this_round = [i for i in range(n) if depth[i] == level]
            for i in this_round:
                if prev_of[i] is None:
                    if per_crop:
                        outputs[i] = self._spare_output(restored.shape[1:]).copy_(restored[i])
                    else:
                        outputs[i] = restored[i].to(dtype, memory_format=torch.contiguous_format, copy=True)
                    rounded[i] = restored[i]  # whole numbers already
            chained = [i for i in this_round if prev_of[i] is not None]
            previous = [outputs[p] if isinstance(p := prev_of[i], int) else p.output for i in chained]
            if per_crop:
                for i in chained:
                    outputs[i] = self._spare_output(restored.shape[1:])
                # the threads share the crops evenly: where they do not divide among them (a
                # batch of one face, or three on two threads), each crop goes in bands of rows
                bands = self.cpu_threads // math.gcd(len(chained), self.cpu_threads) if chained else 1
                pieces = [(i, prev_out, (band * size // bands, (band + 1) * size // bands))
                          for i, prev_out in zip(chained, previous) for band in range(bands)]

                def blend_part(part: slice) -> None:
                    for i, prev_out, rows in pieces[part]:
                        _blend_on_cpu(prev_out.numpy(), theta_host[row[i]], weight_host[row[i], 0],
                                      restored[i].numpy(), rounded[i].numpy(), out=outputs[i].numpy(), rows=rows)

                self._split(blend_part, len(pieces), parallel=True)
            elif chained:
                rows, crops = _rows([row[i] for i in chained], device), _rows(chained, device)
                blended = _blend_batched(torch.stack(previous), theta[rows], weight[rows], restored[crops], dtype)
                whole = (blended.float() + 0.5).clamp_(0, 255).to(torch.uint8)  # blended is the state
                if isinstance(crops, slice):
                    rounded[crops] = whole
                else:
                    rounded.index_copy_(0, crops, whole)
                for j, i in enumerate(chained):
                    outputs[i] = blended[j].clone(memory_format=torch.contiguous_format)

        with self._lock:
            for i, key in enumerate(keys):
                if key in self._tracks:
                    replaced = self._tracks[key].output
                    self._forget(key)
                    if per_crop:  # the crop before this one in the track, in this batch or stored
                        self._spares.append(replaced)
                state = _TrackState(frames[i], affine[i], outputs[i], lowpass[i] if per_crop else lowpass[i].clone())
                self._tracks[key] = state
                self._bytes += state.nbytes
            while self._bytes > self.max_bytes and len(self._tracks) > 1:
                self._forget(next(iter(self._tracks)))  # least recently used
            del self._spares[:max(0, len(self._spares) - n)]  # one batch's worth is all the next batch can use
        return rounded

    def _spare_output(self, shape: torch.Size) -> torch.Tensor:
        """A float32 CPU tensor for a new state's output: a replaced state's, when one of that
        shape is left over (see _scratch: fresh memory costs more than the maths), else new."""
        with self._lock:
            while self._spares:
                spare = self._spares.pop()
                if (spare.shape == shape and spare.dtype == torch.float32 and spare.device.type == "cpu"
                        and spare.is_contiguous()):
                    return spare
        return torch.empty(shape, dtype=torch.float32)
