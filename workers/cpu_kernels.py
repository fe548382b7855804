"""The temporal blend's CPU kernels, compiled with numba (workers/temporal.py calls them for
CPU tensors; a GPU runs the same maths as batched torch ops).

Full size, per crop:
- ``warp_cubic``: ``cv2.warpAffine(src, m, flags=INTER_CUBIC | WARP_INVERSE_MAP,
  borderMode=BORDER_REPLICATE)`` for float32 images: the same Keys cubic (a = -0.75) at each
  pixel's exact source position (as OpenCV 5 places them; OpenCV 4 rounds positions to 1/32
  pixel, up to ~1 gray level apart on sharp edges), the border repeated. OpenCV runs it as scalar code, 16 taps
  per channel per pixel; at 512 px it was over half of the blend's CPU time. Here a row is cut
  into runs: for a warp near the identity (consecutive crops of one face) long runs of output
  pixels read the same four source rows, one source column per output column, so a run is a
  4x4 filter over contiguous memory with weights that change per pixel, which the compiler
  vectorizes (bench/RESULTS.md: 1.1-3x OpenCV's speed, depending on the CPU and on how far
  the face moved: short runs where it turned).
  Pixels whose taps leave the image go one at a time, the border repeated.
- ``warp_blend``: that warp, the blend with the restored crop and the rounding to uint8 in one
  pass, a row at a time while the row is in cache.
- Both take ``rows``: a band of the output rows, so that threads can share one crop.

Thumbnails (registration and the change map), per batch: ``sample`` (grid_sample's bilinear
sampling, a row cut into runs as in warp_cubic), ``normal_equations`` (a Gauss-Newton step's
sums), ``gauss_newton_update`` (its damped 8x8 solve and the warp's update), ``gauss_newton``
(a pyramid level's steps, those three and ``sources`` face by face), ``residual`` (the
registration's score), ``gray``, ``halve`` (the pyramid), ``mean_abs_difference`` and
``change_exponent`` / ``change_exponent_at``, each one pass instead of several torch or numpy
ops over the whole batch; torch still takes the change map's exponential. Per crop,
``thumbnail`` makes a crop's thumbnail from its uint8 pixels.

Indices in vectorized loops are unsigned on purpose: numba wraps negative indices around, and
the check for that kept LLVM from vectorizing (it ran ~4x slower). Fast-math is limited to
reassociation and contraction (sums vectorize, multiply-adds fuse): NaN and infinity keep their
meaning, which the registration's "did refining make it worse" check relies on.
"""

from __future__ import annotations

import cv2
import numpy as np
from numba import njit

CUBIC_A = -0.75  # Keys' parameter, OpenCV's choice


FAST_MATH = {"reassoc", "contract"}  # not "nnan"/"ninf": see above


def _compile(function):
    """njit, nogil (the blend splits a batch, or a crop by rows, over threads), the compiled code
    cached beside the module or in NUMBA_CACHE_DIR (~15 s to compile them all on a 2-core EPYC);
    without a writable cache, compiled once per process."""
    options = dict(nogil=True, fastmath=FAST_MATH, error_model="numpy", boundscheck=False)
    try:
        return njit(cache=True, **options)(function)
    except RuntimeError:  # numba found nowhere to cache
        return njit(**options)(function)


@_compile
def _cubic_weights(f):
    """The four taps' weights at fraction f in [0, 1): Keys' kernel at 1 + f, f, 1 - f, 2 - f."""
    a = np.float32(CUBIC_A)
    one = np.float32(1)
    g = one - f
    afg = a * f * g
    w0 = afg * g
    w3 = afg * f
    w1 = f * f * ((a + np.float32(2)) * f - (a + np.float32(3))) + one
    return w0, w1, one - w0 - w1 - w3, w3


@_compile
def _warp_cubic(src, m, out, blend, weight, restored, rounded, top, bottom, weight_top, weight_rows):
    h, w, ch = src.shape
    n = w * ch
    flat = src.reshape(h, n)
    res = out.reshape(h, n)
    if blend:
        kept = restored.reshape(h, n)
        whole = rounded.reshape(h, n)
        # the weight map's rows weight_top.. upsampled along rows (see warp_blend): the rows
        # each output row takes (numbered in the map), and their shares
        hl, hr, hf = _linear_taps(h, weight_rows)
    column = np.empty(n, np.float32)  # each element's pixel column
    for t in range(n):
        column[t] = t // ch
    sx = np.empty(w, np.float64)  # a row's source positions
    sy = np.empty(w, np.float64)
    ix = np.empty(w, np.int32)  # and their floors (int32: AVX2 converts doubles to those in vectors)
    iy = np.empty(w, np.int32)
    a = np.float32(CUBIC_A)
    one = np.float32(1)
    a2, a3 = a + np.float32(2), a + np.float32(3)
    dx, dy = np.float32(m[0, 0] - 1), np.float32(m[1, 0])  # per column: what the fractions move by
    step1, step2, step3 = np.uint64(ch), np.uint64(2 * ch), np.uint64(3 * ch)
    for y in range(top, bottom):
        bx = m[0, 1] * y + m[0, 2]
        by = m[1, 1] * y + m[1, 2]
        _row_positions(m[0, 0], bx, m[1, 0], by, w, h, sx, sy, ix, iy)
        x = 0
        while x < w:
            jx, jy = ix[x], iy[x]
            if 1 <= jx and jx + 2 <= w - 1 and 1 <= jy and jy + 2 <= h - 1:
                # a run: the same four source rows, one source column per output column, the
                # last one's taps inside the row
                end = min(w, w - 2 - jx + x)
                end = _run_end(iy, x, end, jy, m[1, 0], by - jy, 0)
                end = _run_end(ix, x, end, jx - x, m[0, 0] - 1.0, bx - (jx - x), 1)
                # fractions relative to the run's own floors: small numbers, so float32 keeps them exact
                fx0 = np.float32(bx - (jx - x))
                fy0 = np.float32(by - jy)
                q0 = np.uint64(jy - 1)
                q1, q2, q3 = q0 + np.uint64(1), q0 + np.uint64(2), q0 + np.uint64(3)
                yy = np.uint64(y)
                first = np.uint64(x * ch)
                tap = np.uint64((jx - 1) * ch)  # the run's first pixel's first tap
                # the loop runs on to a whole number of 8-wide vectors where the row and the
                # source allow: the vectorized loop's scalar remainder cost as much as the
                # vectors of a run (~25 px where the face turned 2 degrees). The extra
                # elements' values are wrong but finite, and the next run or border pixel
                # (rows go left to right) overwrites them
                count = min(((end - x) * ch + 7) & -8, (w - x) * ch, n - 3 * ch - (jx - 1) * ch)
                for u in range(np.uint64(max(count, (end - x) * ch))):
                    t = first + u
                    f = dx * column[t] + fx0
                    g = one - f
                    afg = a * f * g
                    c0, c3 = afg * g, afg * f
                    c1 = f * f * (a2 * f - a3) + one
                    c2 = one - c0 - c1 - c3
                    f = dy * column[t] + fy0
                    g = one - f
                    afg = a * f * g
                    e0, e3 = afg * g, afg * f
                    e1 = f * f * (a2 * f - a3) + one
                    e2 = one - e0 - e1 - e3
                    s = tap + u
                    r0 = c0 * flat[q0, s] + c1 * flat[q0, s + step1] + c2 * flat[q0, s + step2] + c3 * flat[q0, s + step3]
                    r1 = c0 * flat[q1, s] + c1 * flat[q1, s + step1] + c2 * flat[q1, s + step2] + c3 * flat[q1, s + step3]
                    r2 = c0 * flat[q2, s] + c1 * flat[q2, s + step1] + c2 * flat[q2, s + step2] + c3 * flat[q2, s + step3]
                    r3 = c0 * flat[q3, s] + c1 * flat[q3, s + step1] + c2 * flat[q3, s + step2] + c3 * flat[q3, s + step3]
                    res[yy, t] = e0 * r0 + e1 * r1 + e2 * r2 + e3 * r3
                x = max(end, x + 1)
            else:  # some taps outside the image: the border repeated, tap by tap
                cx = _cubic_weights(np.float32(sx[x] - jx))
                cy = _cubic_weights(np.float32(sy[x] - jy))
                c0, c1 = min(max(jx - 1, 0), w - 1) * ch, min(max(jx, 0), w - 1) * ch
                c2, c3 = min(max(jx + 1, 0), w - 1) * ch, min(max(jx + 2, 0), w - 1) * ch
                r0, r1 = flat[min(max(jy - 1, 0), h - 1)], flat[min(max(jy, 0), h - 1)]
                r2, r3 = flat[min(max(jy + 1, 0), h - 1)], flat[min(max(jy + 2, 0), h - 1)]
                for k in range(ch):
                    res[y, x * ch + k] = (
                        cy[0] * (((cx[0] * r0[c0 + k] + cx[1] * r0[c1 + k]) + cx[2] * r0[c2 + k]) + cx[3] * r0[c3 + k])
                        + cy[1] * (((cx[0] * r1[c0 + k] + cx[1] * r1[c1 + k]) + cx[2] * r1[c2 + k]) + cx[3] * r1[c3 + k])
                        + cy[2] * (((cx[0] * r2[c0 + k] + cx[1] * r2[c1 + k]) + cx[2] * r2[c2 + k]) + cx[3] * r2[c3 + k])
                        + cy[3] * (((cx[0] * r3[c0 + k] + cx[1] * r3[c1 + k]) + cx[2] * r3[c2 + k]) + cx[3] * r3[c3 + k]))
                x += 1
        if blend:
            _blend_row(res[y], kept[y], weight[hl[y] - weight_top], weight[hr[y] - weight_top], hf[y], whole[y])
    return out


@_compile
def _row_positions(a, b, c, d, w, h, sx, sy, ix, iy):
    """An output row's source positions (a x + b, c x + d) for x = 0..w-1, and their floors.
    Beyond 2 pixels outside the image every tap reads the border (or, sampling with zeros
    outside, nothing): clamping there changes no value and keeps far-off positions in integer range."""
    for x in range(w):
        sx[x] = min(max(a * x + b, -2.0), w + 1.0)
        sy[x] = min(max(c * x + d, -2.0), h + 1.0)
        ix[x] = np.int32(np.floor(sx[x]))
        iy[x] = np.int32(np.floor(sy[x]))


@_compile
def _run_end(floors, x, limit, value, slope, offset, per_column):
    """The first column c after x (at most ``limit``) where floors[c] - per_column * c is no
    longer ``value``: floors[c] - per_column * c is the floor of value + offset + slope * c,
    so where that line next leaves [value, value + 1) is a guess, which the floors themselves
    then correct (a few steps at most: rounding)."""
    if slope > 0:
        guess = np.int64(np.ceil(min((1.0 - offset) / slope, 1e15)))
    elif slope < 0:
        guess = np.int64(np.floor(min(-offset / slope, 1e15))) + 1
    else:
        guess = limit
    end = min(max(guess, x + 1), limit)
    while end > x + 1 and floors[end - 1] - per_column * (end - 1) != value:
        end -= 1
    while end < limit and floors[end] - per_column * end == value:
        end += 1
    return end


@_compile
def _linear_taps(size, source_size):
    """cv2.resize's INTER_LINEAR taps along one axis, source_size -> size: per output index the
    left and right source index and the right one's share (clamped at the edges)."""
    left = np.empty(size, np.int64)
    right = np.empty(size, np.int64)
    share = np.empty(size, np.float32)
    scale = source_size / size
    for i in range(size):
        f = np.float32((i + 0.5) * scale - 0.5)
        j = np.int64(np.floor(f))
        f -= np.float32(j)
        if j < 0:
            f, j = np.float32(0), 0
        if j >= source_size - 1:
            f, j = np.float32(0), source_size - 1
        left[i], right[i], share[i] = j, min(j + 1, source_size - 1), f
    return left, right, share


@_compile
def _blend_row(state, restored, upper, lower, share, rounded):
    """One row of the blend, while the warped row is in cache: state = restored + weight *
    (warped - restored), the weight between two rows of the map (``share`` of the lower one);
    rounded = state rounded to nearest (ties to even) and saturated to 0..255, as OpenCV's
    conversions round."""
    above = np.float32(1) - share
    zero, top = np.float32(0), np.float32(255)
    for t in range(np.uint64(state.shape[0])):
        weight = upper[t] * above + lower[t] * share
        r = np.float32(restored[t])
        v = r + weight * (state[t] - r)
        state[t] = v
        positive = v if v > zero else zero  # NaN too: converting it would be undefined
        rounded[t] = np.uint8(min(np.rint(positive), top))


@_compile
def _normal_equations(warped, sources, centres, target, normal):
    n = warped.shape[0]
    side = centres.shape[0]
    top = np.uint64(side - 1)
    one, zero = np.float32(1), np.float32(0)
    for k in range(n):
        image = warped[k, 0]
        xs, ys, target_k = sources[k, 0], sources[k, 1], target[k, 0]
        total = np.zeros((8, 9), np.float64)
        for row in range(np.uint64(side)):
            v = centres[row]
            above = row - np.uint64(1) if row > 0 else row
            below = row + np.uint64(1) if row < top else row
            s00 = np.float32(0)
            s01 = np.float32(0)
            s02 = np.float32(0)
            s03 = np.float32(0)
            s04 = np.float32(0)
            s05 = np.float32(0)
            s06 = np.float32(0)
            s07 = np.float32(0)
            s08 = np.float32(0)
            s11 = np.float32(0)
            s12 = np.float32(0)
            s13 = np.float32(0)
            s14 = np.float32(0)
            s15 = np.float32(0)
            s16 = np.float32(0)
            s17 = np.float32(0)
            s18 = np.float32(0)
            s22 = np.float32(0)
            s23 = np.float32(0)
            s24 = np.float32(0)
            s25 = np.float32(0)
            s26 = np.float32(0)
            s27 = np.float32(0)
            s28 = np.float32(0)
            s33 = np.float32(0)
            s34 = np.float32(0)
            s35 = np.float32(0)
            s36 = np.float32(0)
            s37 = np.float32(0)
            s38 = np.float32(0)
            s44 = np.float32(0)
            s45 = np.float32(0)
            s46 = np.float32(0)
            s47 = np.float32(0)
            s48 = np.float32(0)
            s55 = np.float32(0)
            s56 = np.float32(0)
            s57 = np.float32(0)
            s58 = np.float32(0)
            s66 = np.float32(0)
            s67 = np.float32(0)
            s68 = np.float32(0)
            s77 = np.float32(0)
            s78 = np.float32(0)
            for col in range(np.uint64(side)):
                left = col - np.uint64(1) if col > 0 else col
                right = col + np.uint64(1) if col < top else col
                u = centres[col]
                inside = one if max(abs(xs[row, col]), abs(ys[row, col])) <= one else zero
                gx = (image[row, right] - image[row, left]) * inside
                gy = (image[below, col] - image[above, col]) * inside
                gxu, gxv, gyu, gyv = gx * u, gx * v, gy * u, gy * v
                wi = image[row, col] * inside
                cur = target_k[row, col]
                s00 += gxu * gxu
                s01 += gxu * gxv
                s02 += gxu * gx
                s03 += gxu * gyu
                s04 += gxu * gyv
                s05 += gxu * gy
                s06 += gxu * wi
                s07 += gxu * inside
                s08 += gxu * cur
                s11 += gxv * gxv
                s12 += gxv * gx
                s13 += gxv * gyu
                s14 += gxv * gyv
                s15 += gxv * gy
                s16 += gxv * wi
                s17 += gxv * inside
                s18 += gxv * cur
                s22 += gx * gx
                s23 += gx * gyu
                s24 += gx * gyv
                s25 += gx * gy
                s26 += gx * wi
                s27 += gx * inside
                s28 += gx * cur
                s33 += gyu * gyu
                s34 += gyu * gyv
                s35 += gyu * gy
                s36 += gyu * wi
                s37 += gyu * inside
                s38 += gyu * cur
                s44 += gyv * gyv
                s45 += gyv * gy
                s46 += gyv * wi
                s47 += gyv * inside
                s48 += gyv * cur
                s55 += gy * gy
                s56 += gy * wi
                s57 += gy * inside
                s58 += gy * cur
                s66 += wi * wi
                s67 += wi * inside
                s68 += wi * cur
                s77 += inside * inside
                s78 += inside * cur
            total[0, 0] += s00
            total[0, 1] += s01
            total[0, 2] += s02
            total[0, 3] += s03
            total[0, 4] += s04
            total[0, 5] += s05
            total[0, 6] += s06
            total[0, 7] += s07
            total[0, 8] += s08
            total[1, 1] += s11
            total[1, 2] += s12
            total[1, 3] += s13
            total[1, 4] += s14
            total[1, 5] += s15
            total[1, 6] += s16
            total[1, 7] += s17
            total[1, 8] += s18
            total[2, 2] += s22
            total[2, 3] += s23
            total[2, 4] += s24
            total[2, 5] += s25
            total[2, 6] += s26
            total[2, 7] += s27
            total[2, 8] += s28
            total[3, 3] += s33
            total[3, 4] += s34
            total[3, 5] += s35
            total[3, 6] += s36
            total[3, 7] += s37
            total[3, 8] += s38
            total[4, 4] += s44
            total[4, 5] += s45
            total[4, 6] += s46
            total[4, 7] += s47
            total[4, 8] += s48
            total[5, 5] += s55
            total[5, 6] += s56
            total[5, 7] += s57
            total[5, 8] += s58
            total[6, 6] += s66
            total[6, 7] += s67
            total[6, 8] += s68
            total[7, 7] += s77
            total[7, 8] += s78
        for i in range(8):
            for j in range(i, 8):
                normal[k, j, i] = normal[k, i, j] = total[i, j]
            normal[k, i, 8] = total[i, 8]


def normal_equations(warped: np.ndarray, sources: np.ndarray, centres: np.ndarray, target: np.ndarray) -> np.ndarray:
    """The Gauss-Newton step's normal equations (workers.temporal's _gauss_newton) in one pass
    over the pixels instead of ~13 torch ops and a matrix product: for warped thumbnails W
    (N x 1 x S x S) sampled at ``sources`` (N x 2 x S x S, normalised), pixel centres (u, v)
    (``centres``) and the target thumbnails (N x 1 x S x S), with inside = both |sources| <= 1
    and gx, gy = W's central differences (the border repeated) times inside, the columns
    c = (gx u, gx v, gx, gy u, gy v, gy, W inside, inside) give N x 8 x 9 float32: sum c c^T,
    and sum c target last. Each row's sums in float32, the rows' in float64."""
    n, _, side, _ = target.shape
    if warped.shape != (n, 1, side, side) or target.shape != (n, 1, side, side) or sources.shape != (n, 2, side, side) \
            or centres.shape != (side,):
        raise ValueError(f"normal_equations: shapes {warped.shape}, {sources.shape}, {centres.shape}, {target.shape} "
                         "do not fit N x 1 x S x S, N x 2 x S x S, S, N x 1 x S x S")
    normal = np.empty((n, 8, 9), np.float32)
    _normal_equations(warped, sources, centres, target, normal)
    return normal


@_compile
def _pairs_summed(row, width, out):
    """out[x, c] = row[2x, c] + row[2x + 1, c] for x < width, 3 channels interleaved (the
    constant strides let LLVM vectorize the interleaved access)."""
    for x in range(np.uint64(width)):
        k = x * np.uint64(6)
        j = x * np.uint64(3)
        out[j] = row[k] + row[k + np.uint64(3)]
        out[j + np.uint64(1)] = row[k + np.uint64(1)] + row[k + np.uint64(4)]
        out[j + np.uint64(2)] = row[k + np.uint64(2)] + row[k + np.uint64(5)]


@_compile
def _thumbnail(crop, taps, scale, out, band, halved, padded, across):
    size = crop.shape[0]
    side = out.shape[1]
    factor = size // side
    n = np.uint64(size * 3)
    t0, t1, t2 = taps[0], taps[1], taps[2]
    last = side - 1
    for i in range(side):
        # the factor source rows of this output row, summed (contiguous: vectorized)
        first = crop[i * factor].reshape(size * 3)
        for t in range(n):
            band[t] = np.float32(first[t])
        for a in range(1, factor):
            row = crop[i * factor + a].reshape(size * 3)
            for t in range(n):
                band[t] += np.float32(row[t])
        # then pairs of columns, until one column per output pixel
        width, source, target = size, band, halved
        while width > side:
            width //= 2
            _pairs_summed(source, width, target)
            source, target = target, source
        # into each channel's plane, 2 pixels of margin, mirrored without the edge pixel
        # (OpenCV's BORDER_REFLECT_101); then the Gaussian along the row
        p0, p1, p2 = padded[0], padded[1], padded[2]
        for j in range(np.uint64(side)):
            k = j * np.uint64(3)
            p0[j + np.uint64(2)] = source[k] * scale
            p1[j + np.uint64(2)] = source[k + np.uint64(1)] * scale
            p2[j + np.uint64(2)] = source[k + np.uint64(2)] * scale
        for c in range(3):
            line = padded[c]
            line[1], line[0] = line[3], line[4]
            line[side + 2], line[side + 3] = line[side], line[side - 1]
            target = across[c, i]
            for j in range(np.uint64(side)):
                target[j] = (line[j] + line[j + np.uint64(4)]) * t0 + (line[j + np.uint64(1)]
                                                                        + line[j + np.uint64(3)]) * t1 \
                    + line[j + np.uint64(2)] * t2
    # the Gaussian down the columns, a row at a time, the rows mirrored as above
    for c in range(3):
        for y in range(side):
            r0, r1 = across[c, abs(y - 2)], across[c, abs(y - 1)]
            r3, r4 = across[c, last - abs(last - y - 1)], across[c, last - abs(last - y - 2)]
            r2, target = across[c, y], out[c, y]
            for j in range(np.uint64(side)):
                target[j] = (r0[j] + r4[j]) * t0 + (r1[j] + r3[j]) * t1 + r2[j] * t2


def thumbnail_fits(shape: tuple, side: int) -> bool:
    """Whether ``thumbnail`` takes crops of this shape to ``side``: 3 channels, square, the
    side times a power of two (GPEN's crops: 256 to 2048 px for a 128 px thumbnail), side >= 3."""
    if len(shape) != 3 or shape[2] != 3 or shape[0] != shape[1] or side < 3 or shape[0] % side:
        return False
    factor = shape[0] // side
    return factor & (factor - 1) == 0


def thumbnail(crop: np.ndarray, side: int, taps: np.ndarray) -> np.ndarray:
    """workers.temporal's thumbnail of one crop in one pass from its uint8 pixels: the mean of
    each (S / side)^2 block (cv2.resize's INTER_AREA at an integer factor), then the separable
    5-tap Gaussian ``taps``, mirrored at the edges without the edge pixel (cv2.GaussianBlur's
    default border): 3 x side x side float32, channels first. OpenCV took 2-3x as long, in four
    calls and three copies (to float, to channels first). For crops that ``thumbnail_fits``;
    the sums' order differs from OpenCV's (float32 rounding apart)."""
    if crop.dtype != np.uint8 or not thumbnail_fits(crop.shape, side) or len(taps) != 5:
        raise ValueError(f"thumbnail takes a square 3-channel uint8 crop whose side is {side} times a power of two, "
                         f"and 5 taps, not {crop.shape} {crop.dtype}, {len(taps)} taps")
    size = crop.shape[0]
    out = np.empty((3, side, side), np.float32)
    taps = np.asarray(taps, np.float32)
    _thumbnail(np.ascontiguousarray(crop), taps, np.float32(1 / (size // side) ** 2), out,
               np.empty(size * 3, np.float32), np.empty(size * 3 // 2 + 3, np.float32),
               np.empty((3, side + 4), np.float32), np.empty((3, side, side), np.float32))
    return out


@_compile
def _gauss_newton_update(theta, normal, damping, min_gain, scale, out, moved):
    n = theta.shape[0]
    a = np.empty((8, 9), np.float64)  # the damped system, right side last, eliminated in place
    x = np.empty(8, np.float64)
    one = np.float32(1)
    for k in range(n):
        for i in range(8):
            for j in range(9):
                a[i, j] = normal[k, i, j]
            a[i, i] = normal[k, i, i] * (one + damping) + damping  # in float32, as torch's path damps
        for c in range(8):  # Gaussian elimination with partial pivoting
            pivot, best = c, abs(a[c, c])
            for r in range(c + 1, 8):
                if abs(a[r, c]) > best:
                    pivot, best = r, abs(a[r, c])
            if pivot != c:
                for j in range(c, 9):
                    a[c, j], a[pivot, j] = a[pivot, j], a[c, j]
            for r in range(c + 1, 8):
                f = a[r, c] / a[c, c]  # a zero pivot gives inf or NaN: passed on, as torch's solve_ex does
                for j in range(c, 9):
                    a[r, j] -= f * a[c, j]
        for i in range(7, -1, -1):
            total = a[i, 8]
            for j in range(i + 1, 8):
                total -= a[i, j] * x[j]
            x[i] = total / a[i, i]
        gain = np.float32(x[6])
        gain = min_gain if gain <= min_gain else gain  # a NaN gain stays NaN, as numpy's maximum keeps it
        # theta o (I + step), the step in the first two rows
        for i in range(3):
            for j in range(3):
                total = theta[k, i, j]
                for c in range(2):
                    total += theta[k, i, c] * (np.float32(x[3 * c + j]) / gain * scale)
                out[k, i, j] = total
        # how far the step moved the image's corners (+-1, +-1): |a| + |b| + |c| per row at most
        moved[k] = max(abs(out[k, 0, 0] - theta[k, 0, 0]) + abs(out[k, 0, 1] - theta[k, 0, 1])
                       + abs(out[k, 0, 2] - theta[k, 0, 2]),
                       abs(out[k, 1, 0] - theta[k, 1, 0]) + abs(out[k, 1, 1] - theta[k, 1, 1])
                       + abs(out[k, 1, 2] - theta[k, 1, 2]))


def gauss_newton_update(theta: np.ndarray, normal: np.ndarray, damping: float, min_gain: float, scale: float
                        ) -> tuple[np.ndarray, np.ndarray]:
    """One Gauss-Newton step of workers.temporal's registration after its normal equations, in
    one pass instead of ~15 numpy calls (each of which held the GIL, which the blend's other
    thread then waited for): per item, damp the 8x8 system's diagonal (x (1 + damping) +
    damping), solve it (float64, partial pivoting) for (gain * step, gain, bias), bound the gain
    below by ``min_gain``, and compose theta <- theta o (I + step * scale / gain), the step
    filling the first two rows. ``theta`` N x 3 x 3 and ``normal`` N x 8 x 9 float32; returns
    the new N x 3 x 3 float32 and how far the step moved each image's corners (N, in
    normalised units, as workers.temporal.corners_moved measures). A singular system gives a
    NaN or infinite warp, not an error."""
    if theta.ndim != 3 or theta.shape[1:] != (3, 3) or normal.shape != (theta.shape[0], 8, 9):
        raise ValueError(f"gauss_newton_update takes N x 3 x 3 warps and N x 8 x 9 systems, not {theta.shape}, "
                         f"{normal.shape}")
    out, moved = np.empty(theta.shape, np.float32), np.empty(theta.shape[0], np.float32)
    _gauss_newton_update(np.ascontiguousarray(theta, dtype=np.float32), np.ascontiguousarray(normal, dtype=np.float32),
                         np.float32(damping), np.float32(min_gain), np.float32(scale), out, moved)
    return out, moved


@_compile
def _gauss_newton(theta, prev, cur, steps, centres, damping, min_gain, scale, converged, out):
    side = centres.shape[0]
    where = np.empty((1, 2, side, side), np.float32)
    warped = np.empty((1, 1, side, side), np.float32)
    normal = np.empty((1, 8, 9), np.float32)
    moved = np.empty(1, np.float32)
    before = np.empty((1, 3, 3), np.float32)
    for k in range(theta.shape[0]):
        t = out[k:k + 1]
        t[:] = theta[k:k + 1]
        for _ in range(steps):
            _sources(t, centres, where)
            _sample(prev[k:k + 1], t, True, warped)
            _normal_equations(warped, where, centres, cur[k:k + 1], normal)
            before[:] = t
            _gauss_newton_update(before, normal, damping, min_gain, scale, t, moved)
            if not moved[0] >= converged:  # NaN too
                break


def gauss_newton(theta: np.ndarray, prev: np.ndarray, cur: np.ndarray, steps: int, centres: np.ndarray,
                 damping: float, min_gain: float, scale: float, converged: float) -> np.ndarray:
    """workers.temporal's Gauss-Newton steps at one pyramid level, all of them in one call: per
    pair of thumbnails (N x 1 x S x S, float32), up to ``steps`` of (sampling positions, prev
    sampled there with the border repeated, normal_equations, gauss_newton_update), stopping
    after a step that moved the image's corners less than ``converged`` (normalised units). Face
    by face, so a face that stopped costs nothing more and nothing is copied out for the faces
    still moving, and no GIL between steps. Returns the N x 3 x 3 warps."""
    n, _, side, width = cur.shape
    if theta.shape != (n, 3, 3) or prev.shape != cur.shape or cur.shape[1] != 1 or width != side \
            or centres.shape != (side,):
        raise ValueError(f"gauss_newton takes N x 3 x 3 warps, two N x 1 x S x S thumbnails and S centres, not "
                         f"{theta.shape}, {prev.shape}, {cur.shape}, {centres.shape}")
    out = np.empty((n, 3, 3), np.float32)
    _gauss_newton(np.ascontiguousarray(theta, dtype=np.float32), np.ascontiguousarray(prev, dtype=np.float32),
                  np.ascontiguousarray(cur, dtype=np.float32), steps, np.ascontiguousarray(centres, dtype=np.float32),
                  np.float32(damping), np.float32(min_gain), np.float32(scale), np.float32(converged), out)
    return out


@_compile
def _halve(images, out):
    for k in range(images.shape[0]):
        for c in range(images.shape[1]):
            for i in range(out.shape[2]):
                upper, lower, target = images[k, c, 2 * i], images[k, c, 2 * i + 1], out[k, c, i]
                for j in range(np.uint64(out.shape[3])):
                    left, right = j * np.uint64(2), j * np.uint64(2) + np.uint64(1)
                    target[j] = ((upper[left] + lower[left]) + (upper[right] + lower[right])) * np.float32(0.25)


def halve(images: np.ndarray) -> np.ndarray:
    """N x C x H x W float32 -> N x C x H/2 x W/2: the means of 2x2 blocks (H and W even), in
    one pass (torch's strided views took four, and the registration's pyramid a concatenation)."""
    if images.ndim != 4 or images.shape[2] % 2 or images.shape[3] % 2 or images.dtype != np.float32:
        raise ValueError(f"halve takes N x C x H x W float32 images of even sides, not {images.shape} {images.dtype}")
    n, c, h, w = images.shape
    out = np.empty((n, c, h // 2, w // 2), np.float32)
    _halve(np.ascontiguousarray(images), out)
    return out


@_compile
def _gray(thumbs, weights, out):
    for k in range(thumbs.shape[0]):
        r, g, b, o = thumbs[k, 0], thumbs[k, 1], thumbs[k, 2], out[k, 0]
        for i in range(np.uint64(thumbs.shape[2])):
            for j in range(np.uint64(thumbs.shape[3])):
                o[i, j] = r[i, j] * weights[0] + g[i, j] * weights[1] + b[i, j] * weights[2]


def gray(thumbs: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """N x 3 x S x S -> N x 1 x S x S: the channels' weighted sum (float32)."""
    if thumbs.ndim != 4 or thumbs.shape[1] != 3 or len(weights) != 3:
        raise ValueError(f"gray takes N x 3 x S x S thumbnails and 3 weights, not {thumbs.shape}, {len(weights)}")
    out = np.empty((thumbs.shape[0], 1) + thumbs.shape[2:], np.float32)
    _gray(thumbs, weights.astype(np.float32), out)
    return out


@_compile
def _mean_abs_difference(a, b, out):
    for k in range(a.shape[0]):
        x, y = a[k].ravel(), b[k].ravel()
        total = 0.0
        for i in range(np.uint64(x.shape[0])):
            total += abs(x[i] - y[i])
        out[k] = total / x.shape[0]


def mean_abs_difference(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per item of the first axis, mean |a - b| (float32, summed in float64)."""
    if a.shape != b.shape:
        raise ValueError(f"a and b must have one shape, not {a.shape} and {b.shape}")
    out = np.empty(a.shape[0], np.float32)
    _mean_abs_difference(np.ascontiguousarray(a), np.ascontiguousarray(b), out)
    return out


@_compile
def _change_exponent(warped, cur, sources, outside, blend_sigma, reach, out):
    n, channels, h, w = cur.shape
    change = np.empty((h, w), np.float32)
    across = np.empty((h, w), np.float32)
    uncovered = np.empty(w, np.float32)  # a row's outside * (1 - coverage)
    one, scale = np.float32(1), np.float32(1 / (channels * 255))
    # each loop reads one array and writes another along a row (or whole rows): vectorized
    analytic = sources.shape[0] == n  # coverage from the sampling positions, not a channel of warped
    zero, half = np.float32(0), np.float32(0.5)
    for k in range(n):
        for i in range(h):
            row = change[i]
            if analytic:
                # what grid_sample's bilinear taps inside the image weigh together (zeros
                # padding, align_corners=False): per axis the inside taps' weights, multiplied
                xs, ys = sources[k, 0, i], sources[k, 1, i]
                for j in range(np.uint64(w)):
                    x = ((xs[j] + one) * np.float32(w) - one) * half
                    y = ((ys[j] + one) * np.float32(h) - one) * half
                    x0, y0 = np.floor(x), np.floor(y)
                    fx, fy = x - x0, y - y0
                    cx = ((one - fx) if zero <= x0 <= np.float32(w - 1) else zero) \
                        + (fx if -one <= x0 <= np.float32(w - 2) else zero)
                    cy = ((one - fy) if zero <= y0 <= np.float32(h - 1) else zero) \
                        + (fy if -one <= y0 <= np.float32(h - 2) else zero)
                    row[j] = zero
                    uncovered[j] = outside * (one - cx * cy)
            else:
                covered = warped[k, channels, i]
                for j in range(np.uint64(w)):
                    row[j] = zero
                    uncovered[j] = outside * (one - covered[j])
            for c in range(channels):
                now, before = cur[k, c, i], warped[k, c, i]
                for j in range(np.uint64(w)):
                    row[j] += abs(now[j] - (before[j] + uncovered[j]))
            for j in range(np.uint64(w)):
                row[j] *= scale
        # the maximum over a (2 reach + 1)^2 window, along rows then columns: one shifted
        # contiguous range per offset and direction (the window stops at the edges)
        across[:] = change
        for i in range(h):
            source, target = change[i], across[i]
            for d in range(np.uint64(1), np.uint64(reach + 1)):
                for j in range(np.uint64(max(w - np.int64(d), 0))):
                    target[j] = max(target[j], source[j + d])
                for j in range(d, np.uint64(w)):
                    target[j] = max(target[j], source[j - d])
        dilated = out[k, 0]
        dilated[:] = across
        for d in range(1, reach + 1):
            for i in range(h - d):
                below, target = across[i + d], dilated[i]
                for j in range(np.uint64(w)):
                    target[j] = max(target[j], below[j])
            for i in range(d, h):
                above, target = across[i - d], dilated[i]
                for j in range(np.uint64(w)):
                    target[j] = max(target[j], above[j])
        for i in range(h):
            target = dilated[i]
            for j in range(np.uint64(w)):
                scaled = target[j] / blend_sigma
                target[j] = -(scaled * scaled)


def change_exponent(warped: np.ndarray, cur: np.ndarray, outside: float, blend_sigma: float, dilate: int,
                    sources: np.ndarray | None = None) -> np.ndarray:
    """Most of the change map (workers.temporal.change_weight) in one pass: from the previous
    thumbnails warped with a coverage channel last (N x C+1 x L x L) and the current ones
    (N x C x L x L), change = mean |cur - (warped + outside * (1 - coverage))| / 255, dilated
    over a ``dilate`` x ``dilate`` window: returns -(change / sigma)^2 (N x 1 x L x L), whose
    exponential torch takes (vectorized; numba's is not, here). With ``sources`` (the N x 2 x
    L x L normalised positions warped was sampled at, zeros padding), warped has the C channels
    only and the coverage is worked out from the positions (the same sums as grid_sample's,
    in another order: float32 rounding apart), which saves sampling a channel of ones."""
    n, channels, h, w = cur.shape
    expected = (n, channels + (sources is None), h, w)
    if warped.shape != expected:
        raise ValueError(f"warped must be {expected} (with the coverage last unless sources are given), "
                         f"not {warped.shape}")
    if sources is not None and sources.shape != (n, 2, h, w):
        raise ValueError(f"sources must be {(n, 2, h, w)}, not {sources.shape}")
    out = np.empty((n, 1, h, w), np.float32)
    _change_exponent(warped, cur, _NO_SOURCES if sources is None else sources, np.float32(outside),
                     np.float32(blend_sigma), dilate // 2, out)
    return out


_NO_SOURCES = np.zeros((0, 2, 1, 1), np.float32)


@_compile
def _sources(theta, centres, out):
    side = centres.shape[0]
    for k in range(theta.shape[0]):
        for axis in range(2):
            a, b, c = theta[k, axis, 0], theta[k, axis, 1], theta[k, axis, 2]
            for i in range(side):
                row = b * centres[i] + c
                for j in range(np.uint64(side)):
                    out[k, axis, i, j] = a * centres[j] + row


def sources(theta: np.ndarray, centres: np.ndarray) -> np.ndarray:
    """N x 2 x S x S: where each pixel's normalised (x, y) comes from under the warps theta
    (N x 3 x 3), the pixel centres at ``centres`` along each axis."""
    if theta.ndim != 3 or theta.shape[1:] != (3, 3) or centres.ndim != 1:
        raise ValueError(f"sources takes N x 3 x 3 warps and 1-D centres, not {theta.shape}, {centres.shape}")
    out = np.empty((theta.shape[0], 2, centres.shape[0], centres.shape[0]), np.float32)
    _sources(np.ascontiguousarray(theta, dtype=np.float32), centres, out)
    return out


_LARGEST = 1e100  # a warp coefficient beyond this is nonsense, and its products could overflow


@_compile
def _sample(images, theta, border, out):
    n, channels, h, w = images.shape
    one, zero = np.float32(1), np.float32(0)
    sx = np.empty(w, np.float64)  # a row's source positions (see _row_positions)
    sy = np.empty(w, np.float64)
    ix = np.empty(w, np.int32)  # and their floors
    iy = np.empty(w, np.int32)
    for k in range(n):
        # the normalised warp in pixels: x' = m00 x + m01 y + m02 (pixel centres at 0..w-1; a
        # normalised unit is w / 2 pixels across, h / 2 down)
        t00, t01, t02 = np.float64(theta[k, 0, 0]), np.float64(theta[k, 0, 1]), np.float64(theta[k, 0, 2])
        t10, t11, t12 = np.float64(theta[k, 1, 0]), np.float64(theta[k, 1, 1]), np.float64(theta[k, 1, 2])
        m00, m01, m10, m11 = t00, t01 * w / h, t10 * h / w, t11
        m02 = (m00 * (1 - w) + m01 * (1 - h)) * 0.5 + (t02 + 1) * w * 0.5 - 0.5
        m12 = (m10 * (1 - w) + m11 * (1 - h)) * 0.5 + (t12 + 1) * h * 0.5 - 0.5
        if not (abs(m00) < _LARGEST and abs(m01) < _LARGEST and abs(m02) < _LARGEST
                and abs(m10) < _LARGEST and abs(m11) < _LARGEST and abs(m12) < _LARGEST):
            out[k] = np.nan  # a warp gone NaN or infinite samples nothing (the caller's checks see NaN)
            continue
        dx, dy = np.float32(m00 - 1), np.float32(m10)  # per column: what the fractions move by
        for y in range(h):
            bx = m01 * y + m02
            by = m11 * y + m12
            _row_positions(m00, bx, m10, by, w, h, sx, sy, ix, iy)
            x = 0
            while x < w:
                jx, jy = ix[x], iy[x]
                if 0 <= jx and jx + 1 <= w - 1 and 0 <= jy and jy + 1 <= h - 1:
                    # a run: the same two source rows, one source column per output column (a
                    # scan over the floors: runs on thumbnails are short, where _run_end's guess costs more)
                    limit = min(w, w - 1 - jx + x)
                    end = x + 1
                    while end < limit and iy[end] == jy and ix[end] - end == jx - x:
                        end += 1
                    # the fractions from the run's first pixel on: in [0, 1) there, moving by dx and
                    # dy a column (from column 0 on they would cancel large numbers for a large warp)
                    fx0 = np.float32(m00 * x + bx - jx)
                    fy0 = np.float32(m10 * x + by - jy)
                    first, tap = np.uint64(x), np.uint64(jx)
                    for c in range(channels):
                        upper, lower, row = images[k, c, jy], images[k, c, jy + 1], out[k, c, y]
                        for u in range(np.uint64(end - x)):
                            fx = dx * np.float32(u) + fx0
                            fy = dy * np.float32(u) + fy0
                            s = tap + u
                            top = upper[s] + fx * (upper[s + np.uint64(1)] - upper[s])
                            bottom = lower[s] + fx * (lower[s + np.uint64(1)] - lower[s])
                            row[first + u] = top + fy * (bottom - top)
                    x = end
                else:  # a tap outside: grid_sample's padding, pixel by pixel
                    px, py = m00 * x + bx, m10 * x + by
                    if border:  # the position clamped into the image
                        px, py = min(max(px, 0.0), w - 1.0), min(max(py, 0.0), h - 1.0)
                    else:  # taps outside count zero (beyond 2 pixels out, all of them)
                        px, py = min(max(px, -2.0), w + 1.0), min(max(py, -2.0), h + 1.0)
                    x0, y0 = np.floor(px), np.floor(py)
                    fx, fy = np.float32(px - x0), np.float32(py - y0)
                    a, b = np.int64(x0), np.int64(y0)
                    wx0 = (one - fx) if 0 <= a <= w - 1 else zero
                    wx1 = fx if 0 <= a + 1 <= w - 1 else zero
                    wy0 = (one - fy) if 0 <= b <= h - 1 else zero
                    wy1 = fy if 0 <= b + 1 <= h - 1 else zero
                    xa, xb = min(max(a, 0), w - 1), min(max(a + 1, 0), w - 1)
                    ya, yb = min(max(b, 0), h - 1), min(max(b + 1, 0), h - 1)
                    for c in range(channels):
                        p = images[k, c]
                        out[k, c, y, x] = (p[ya, xa] * wx0 + p[ya, xb] * wx1) * wy0 \
                            + (p[yb, xa] * wx0 + p[yb, xb] * wx1) * wy1
                    x += 1


def sample(images: np.ndarray, theta: np.ndarray, border: bool) -> np.ndarray:
    """``F.grid_sample(images, grid, mode="bilinear", padding_mode="border" if border else
    "zeros", align_corners=False)`` with the grid of the normalised warps ``theta`` (N x 3 x 3,
    as workers.temporal uses them), for float32 images N x C x H x W. torch samples pixel by
    pixel through vectorized gathers; here, as in warp_cubic, a row is cut into runs that read
    the same two source rows, one source column per output column, which vectorize over
    contiguous memory (bench/cpu_kernels.py: 1.4-3x torch's speed on 128 px thumbnails; float32
    rounding apart, the same values). A warp that is not finite gives NaN."""
    if images.ndim != 4 or theta.shape != (images.shape[0], 3, 3):
        raise ValueError(f"sample takes N x C x H x W images and N x 3 x 3 warps, not {images.shape}, {theta.shape}")
    out = np.empty(images.shape, np.float32)
    _sample(np.ascontiguousarray(images, dtype=np.float32), np.ascontiguousarray(theta, dtype=np.float32),
            bool(border), out)
    return out


@_compile
def _residual(prev, cur, theta, out):
    n, channels, h, w = cur.shape
    warped = np.empty((1, channels, h, w), np.float32)
    total = np.empty(1, np.float32)
    for k in range(n):
        _sample(prev[k:k + 1], theta[k:k + 1], True, warped)
        _mean_abs_difference(warped, cur[k:k + 1], total)
        out[k] = total[0]


def residual(prev: np.ndarray, cur: np.ndarray, theta: np.ndarray) -> np.ndarray:
    """Per pair of thumbnails (N x C x H x W float32), mean |prev(theta(x)) - cur(x)|, prev
    sampled as ``sample`` samples it with the border repeated (NaN for a warp that is not
    finite): workers.temporal's registration scores. Face by face through one small work
    array: a batch's samples written out and read back cost fresh memory and cache misses."""
    if prev.shape != cur.shape or prev.ndim != 4 or theta.shape != (cur.shape[0], 3, 3):
        raise ValueError(f"residual takes two N x C x H x W arrays and N x 3 x 3 warps, not {prev.shape}, "
                         f"{cur.shape}, {theta.shape}")
    out = np.empty(cur.shape[0], np.float32)
    _residual(np.ascontiguousarray(prev, dtype=np.float32), np.ascontiguousarray(cur, dtype=np.float32),
              np.ascontiguousarray(theta, dtype=np.float32), out)
    return out


@_compile
def _change_exponent_at(prev, cur, theta, centres, outside, blend_sigma, reach, out):
    n, channels, h, w = cur.shape
    warped = np.empty((1, channels, h, w), np.float32)
    where = np.empty((1, 2, h, w), np.float32)
    for k in range(n):
        _sample(prev[k:k + 1], theta[k:k + 1], False, warped)
        _sources(theta[k:k + 1], centres, where)
        _change_exponent(warped, cur[k:k + 1], where, outside, blend_sigma, reach, out[k:k + 1])


def change_exponent_at(prev: np.ndarray, cur: np.ndarray, theta: np.ndarray, centres: np.ndarray, outside: float,
                       blend_sigma: float, dilate: int) -> np.ndarray:
    """change_exponent with the previous thumbnails (N x C x L x L) sampled here at warps
    ``theta`` (as ``sample`` samples, zeros padding) and the coverage worked out from the
    sampling positions (pixel centres at ``centres`` along each axis): face by face through
    small work arrays, one call for the batch."""
    n, channels, h, w = cur.shape
    if prev.shape != cur.shape or theta.shape != (n, 3, 3) or h != w or centres.shape != (w,):
        raise ValueError(f"change_exponent_at takes two N x C x L x L arrays, N x 3 x 3 warps and L centres, not "
                         f"{prev.shape}, {cur.shape}, {theta.shape}, {centres.shape}")
    out = np.empty((n, 1, h, w), np.float32)
    _change_exponent_at(np.ascontiguousarray(prev, dtype=np.float32), np.ascontiguousarray(cur, dtype=np.float32),
                        np.ascontiguousarray(theta, dtype=np.float32), np.ascontiguousarray(centres, dtype=np.float32),
                        np.float32(outside), np.float32(blend_sigma), dilate // 2, out)
    return out


def _check_warp(src: np.ndarray, m, out: np.ndarray | None, rows: tuple[int, int] | None
                ) -> tuple[np.ndarray, np.ndarray, int, int]:
    if src.dtype != np.float32 or src.ndim != 3 or not src.flags.c_contiguous:
        raise ValueError(f"src must be a C-contiguous H x W x C float32 array, not {src.shape} {src.dtype}")
    if out is None:
        out = np.empty_like(src)
    if out.shape != src.shape or out.dtype != np.float32 or not out.flags.c_contiguous:
        raise ValueError(f"out must be a C-contiguous {src.shape} float32 array, not {out.shape} {out.dtype}")
    if np.shares_memory(src, out):
        raise ValueError("out must not overlap src")
    m = np.ascontiguousarray(np.asarray(m, dtype=np.float64)[:2])
    if m.shape != (2, 3):
        raise ValueError(f"the warp must be 2x3 (or 3x3), not {m.shape}")
    if not (np.abs(m) < _LARGEST).all():  # NaN fails too
        raise ValueError(f"the warp must be finite: {m.tolist()}")
    top, bottom = (0, src.shape[0]) if rows is None else (int(rows[0]), int(rows[1]))
    if not 0 <= top <= bottom <= src.shape[0]:
        raise ValueError(f"rows {rows} are not a range of the {src.shape[0]} rows")
    return m, out, top, bottom


_NO_WEIGHT = np.zeros((1, 1), np.float32)
_NO_PIXELS = np.zeros((1, 1, 1), np.uint8)


def warp_cubic(src: np.ndarray, m, out: np.ndarray | None = None, rows: tuple[int, int] | None = None) -> np.ndarray:
    """out(x, y) = src(m @ (x, y, 1)), bicubic, the border repeated: ``src`` and ``out`` are
    H x W x C float32, C-contiguous, ``m`` the 2x3 map from output to source pixels (pixel
    centres at integers, as OpenCV's WARP_INVERSE_MAP takes it). ``rows`` (top, bottom): only
    those rows of ``out`` (the others are left as they are), so that threads can share a crop."""
    m, out, top, bottom = _check_warp(src, m, out, rows)
    return _warp_cubic(src, m, out, False, _NO_WEIGHT, _NO_PIXELS, _NO_PIXELS, top, bottom, 0, 1)


def warp_blend(previous: np.ndarray, m, weight: np.ndarray, restored: np.ndarray, rounded: np.ndarray,
               out: np.ndarray | None = None, rows: tuple[int, int] | None = None) -> np.ndarray:
    """The temporal blend of one crop in one pass: out = restored + w * (warp_cubic(previous, m)
    - restored), w the L x L ``weight`` map upsampled bilinearly (as cv2.resize does) to the
    crop, ``restored`` uint8 or whole numbers in a float type. ``rounded`` (uint8, the crop's
    shape) gets out rounded to nearest, ties to even, and saturated, as OpenCV rounds. A row at
    a time, so the warped values are blended while they are in cache: before, each of six steps
    read and wrote the whole 3 MB crop at 512 px. ``rows``: as in warp_cubic (``out`` and
    ``rounded`` only there)."""
    m, out, top, bottom = _check_warp(previous, m, out, rows)
    if restored.shape != previous.shape:
        raise ValueError(f"restored must be a {previous.shape} array, not {restored.shape}")
    if restored.dtype not in (np.uint8, np.float32):  # whole numbers in another float type (float16)
        restored = restored.astype(np.float32)
    restored = np.ascontiguousarray(restored)
    if rounded.shape != previous.shape or rounded.dtype != np.uint8 or not rounded.flags.c_contiguous:
        raise ValueError(f"rounded must be a C-contiguous {previous.shape} uint8 array, not {rounded.shape} {rounded.dtype}")
    if weight.ndim != 2 or weight.dtype != np.float32:
        raise ValueError(f"weight must be a 2-D float32 array, not {weight.shape} {weight.dtype}")
    # cv2.resize(INTER_LINEAR) upsamples along rows, then down columns. The first pass, its SIMD
    # code, here, the same value repeated for each channel, for the map's rows these output rows
    # take; the second in the kernel, row by row. The whole map goes through the first pass:
    # OpenCV's code differs with the number of rows (a one-row map came out 3e-8 apart)
    h, w, ch = previous.shape
    upper, lower, _ = _linear_taps(h, weight.shape[0])
    first, last = (int(upper[top]), int(lower[bottom - 1])) if bottom > top else (0, 0)
    along_rows = cv2.resize(weight, (w, weight.shape[0]), interpolation=cv2.INTER_LINEAR)
    rows_used = along_rows[first:last + 1]
    # each value once per channel: cv2.merge interleaves the same plane ch times (3.5x np.repeat's speed)
    wide = cv2.merge([rows_used] * ch).reshape(len(rows_used), w * ch) if 1 < ch <= 4 else np.repeat(rows_used, ch, axis=1)
    return _warp_cubic(previous, m, out, True, wide, restored, rounded, top, bottom, first, weight.shape[0])


def warm_up() -> None:
    """Compile (or load from numba's cache) every kernel for the types the blender uses, so
    that a CPU worker's first batch does not wait for it: ~15 s compiling, ~0.3 s from the cache
    (beside this file, or in NUMBA_CACHE_DIR where that is not writable: the Docker images set it)."""
    previous = np.zeros((4, 4, 3), np.float32)
    weight = np.ones((2, 2), np.float32)
    for restored in (np.zeros((4, 4, 3), np.uint8), np.zeros((4, 4, 3), np.float32)):
        warp_blend(previous, np.eye(3)[:2], weight, restored, np.empty((4, 4, 3), np.uint8))
    warp_cubic(previous, np.eye(3)[:2])
    thumbs = np.zeros((1, 3, 4, 4), np.float32)
    planes = gray(thumbs, np.ones(3))
    mean_abs_difference(planes, planes)
    normal_equations(planes, np.zeros((1, 2, 4, 4), np.float32), np.zeros(4, np.float32), planes)
    change_exponent(np.zeros((1, 4, 4, 4), np.float32), thumbs, -1e4, 0.1, 3)
    change_exponent(thumbs, thumbs, -1e4, 0.1, 3, np.zeros((1, 2, 4, 4), np.float32))
    sources(np.zeros((1, 3, 3), np.float32), np.zeros(4, np.float32))
    for border in (True, False):
        sample(thumbs, np.eye(3, dtype=np.float32)[None], border)
    residual(thumbs, thumbs, np.eye(3, dtype=np.float32)[None])
    change_exponent_at(thumbs, thumbs, np.eye(3, dtype=np.float32)[None], np.zeros(4, np.float32), -1e4, 0.1, 3)
    gauss_newton_update(np.eye(3, dtype=np.float32)[None], np.eye(8, 9, dtype=np.float32)[None], 1e-6, 0.1, 1.0)
    gauss_newton(np.eye(3, dtype=np.float32)[None], planes, planes, 2, np.zeros(4, np.float32), 1e-6, 0.1, 1.0, 0.1)
    thumbnail(np.zeros((8, 8, 3), np.uint8), 4, np.full(5, 0.2, np.float32))
    halve(planes)
