"""The temporal blend's numba kernels (workers.cpu_kernels) against plain numpy maths and OpenCV."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from workers.cpu_kernels import normal_equations, warp_blend, warp_cubic


def bicubic_float64(src: np.ndarray, m: np.ndarray) -> np.ndarray:
    """The warp by the book: every output pixel's exact source position in float64, Keys' cubic
    (a = -0.75), each tap's index clamped (the border repeated)."""
    h, w = src.shape[:2]
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float64)
    sx = m[0, 0] * xs + m[0, 1] * ys + m[0, 2]
    sy = m[1, 0] * xs + m[1, 1] * ys + m[1, 2]
    sx, sy = np.clip(sx, -1e9, 1e9), np.clip(sy, -1e9, 1e9)
    x0, y0 = np.floor(sx), np.floor(sy)

    def taps(f):
        a, g = -0.75, 1 - f
        w0, w3, w1 = a * f * g * g, a * f * f * g, f * f * ((a + 2) * f - (a + 3)) + 1
        return w0, w1, 1 - w0 - w1 - w3, w3

    out = np.zeros(src.shape, np.float64)
    for j, wy in enumerate(taps(sy - y0)):
        rows = np.clip(y0.astype(np.int64) + j - 1, 0, h - 1)
        for i, wx in enumerate(taps(sx - x0)):
            cols = np.clip(x0.astype(np.int64) + i - 1, 0, w - 1)
            out += (wy * wx)[..., None] * src[rows, cols]
    return out


def smooth_image(rng, h: int, w: int, ch: int = 3) -> np.ndarray:
    image = rng.uniform(0, 255, (h, w, ch)).astype(np.float32)
    return np.ascontiguousarray(cv2.GaussianBlur(image, (0, 0), 1.0).reshape(h, w, ch))


def rotation(size: int, degrees: float, scale: float = 1.0, shift=(0.0, 0.0)) -> np.ndarray:
    return cv2.getRotationMatrix2D((size / 2 - 0.5, size / 2 - 0.5), degrees, scale) + np.array([[0, 0, shift[0]],
                                                                                               [0, 0, shift[1]]])


WARPS = {
    "identity": np.array([[1.0, 0, 0], [0, 1, 0]]),
    "sub-pixel shift": np.array([[1.0, 0, 0.37], [0, 1, -0.61]]),
    "near identity": np.array([[1.002, 0.003, 0.5], [-0.003, 1.001, 0.3]]),
    "tracked face, frame to frame": rotation(96, 2.4, 0.94, (3.1, -1.7)),
    "large rotation": rotation(96, 35, 1.2),
    "mirrored": np.array([[-1.0, 0, 95.3], [0, 1, 0.2]]),
    "shrinking": np.array([[2.7, 0.1, -20], [-0.2, 2.5, -30]]),
    "far outside": np.array([[1.0, 0, 1e7], [0, 1, -3e6]]),
}


@pytest.mark.parametrize("name", WARPS)
def test_the_warp_is_bicubic_at_each_pixels_exact_position(name):
    src = smooth_image(np.random.default_rng(1), 96, 96)
    got = warp_cubic(src, WARPS[name])
    assert np.abs(got - bicubic_float64(src.astype(np.float64), WARPS[name])).max() < 2e-3


def test_a_nonsensical_warp_still_reads_only_the_image():
    """Coefficients so large that the order of the sums decides where a pixel lands: no exact
    answer to compare with, but every value must come from the image's neighbourhoods."""
    src = smooth_image(np.random.default_rng(4), 32, 32)
    got = warp_cubic(src, np.array([[1e60, -1e60, 3], [2e50, 1, 1e70]]))
    spread = src.max() - src.min()
    assert np.isfinite(got).all() and src.min() - spread / 4 <= got.min() and got.max() <= src.max() + spread / 4


def test_the_warp_is_opencvs_bicubic_warp():
    """What the blend used before: within OpenCV 5's float32 rounding of positions, or OpenCV
    4's rounding of them to 1/32 pixel."""
    src = smooth_image(np.random.default_rng(2), 256, 256)
    tolerance = 0.01 if int(cv2.__version__.split(".")[0]) >= 5 else 1.0
    for m in (WARPS["near identity"], rotation(256, 1.5, 1.03, (2.2, 0.4))):
        expected = cv2.warpAffine(src, m, (256, 256), flags=cv2.INTER_CUBIC | cv2.WARP_INVERSE_MAP,
                                  borderMode=cv2.BORDER_REPLICATE)
        assert np.abs(warp_cubic(src, m) - expected).max() < tolerance


@settings(max_examples=150, deadline=None)
@given(h=st.integers(1, 40), w=st.integers(1, 40), ch=st.integers(1, 4), seed=st.integers(0, 2**32 - 1),
       spread=st.sampled_from([0.0, 0.01, 0.1, 1.0]))
def test_the_warp_is_bicubic_for_any_shape_and_warp(h, w, ch, seed, spread):
    rng = np.random.default_rng(seed)
    src = rng.uniform(-50, 300, (h, w, ch)).astype(np.float32)
    m = np.array([[1.0, 0, 0], [0, 1, 0]]) + rng.normal(0, spread, (2, 3)) * [[1, 1, w], [1, 1, h]]
    got = warp_cubic(src, m)
    assert np.abs(got - bicubic_float64(src.astype(np.float64), m)).max() < 2e-3 * (1 + np.abs(m[:, :2]).max())


def test_the_warp_stays_inside_its_arrays(tmp_path):
    """The kernel runs without bounds checks; here numba checks every index (NUMBA_BOUNDSCHECK
    overrides the kernel's own setting), over warps and shapes that put runs against every edge."""
    script = """
import numpy as np
from workers import cpu_kernels
from workers.cpu_kernels import warp_blend, warp_cubic
rng = np.random.default_rng(7)
for trial in range(300):
    h, w, ch = int(rng.integers(1, 24)), int(rng.integers(1, 24)), int(rng.integers(1, 4))
    src = rng.uniform(0, 255, (h, w, ch)).astype(np.float32)
    m = np.array([[1.0, 0, 0], [0, 1, 0]]) + rng.normal(0, [0.02, 0.3][trial % 2], (2, 3)) * [[1, 1, w], [1, 1, h]]
    warp_cubic(src, m)
    restored = rng.integers(0, 256, (h, w, ch), dtype=np.uint8)
    weight = rng.uniform(0, 1, (int(rng.integers(1, 9)), int(rng.integers(1, 9)))).astype(np.float32)
    warp_blend(src, m, weight, restored, np.empty_like(restored))
    whole = warp_blend(src, m, weight, restored, np.empty_like(restored))
    top = int(rng.integers(0, h + 1))
    bottom = int(rng.integers(top, h + 1))
    band = warp_blend(src, m, weight, restored, np.empty_like(restored), out=np.empty_like(src), rows=(top, bottom))
    # numba wraps a negative index before checking it: a weight row off by one would read another
    # row, not fail, so the band's values are checked too
    assert np.array_equal(band[top:bottom], whole[top:bottom], equal_nan=True), (h, w, top, bottom)
    side, n = int(rng.integers(1, 6)), int(rng.integers(1, 3))
    planes = rng.uniform(0, 255, (n, 1, side, side)).astype(np.float32)
    thumbs = rng.uniform(0, 255, (n, 3, side, side)).astype(np.float32)
    centres = np.linspace(-1, 1, side).astype(np.float32)
    theta = np.tile(np.eye(3, dtype=np.float32), (n, 1, 1))
    where = cpu_kernels.sources(theta, centres)
    cpu_kernels.normal_equations(planes, where, centres, planes)
    cpu_kernels.gauss_newton(theta + rng.normal(0, 0.3, theta.shape).astype(np.float32), planes, planes[::-1].copy(), 2,
                             centres, 1e-6, 0.1, 1.0, 0.0)
    cpu_kernels.gray(thumbs, np.ones(3))
    cpu_kernels.mean_abs_difference(planes, planes)
    cpu_kernels.change_exponent(np.concatenate([thumbs, planes], axis=1), thumbs, -1e4, 0.1, [3, 5, 7][trial % 3])
    cpu_kernels.change_exponent(thumbs, thumbs, -1e4, 0.1, [3, 5, 7][trial % 3], where)
    cpu_kernels.halve(rng.uniform(0, 1, (n, 2, 2 * side, 4 * side)).astype(np.float32))
    spread = [0.02, 0.5][trial % 2]
    theta = np.tile(np.eye(3, dtype=np.float32), (n, 1, 1)) + rng.normal(0, spread, (n, 3, 3)).astype(np.float32)
    for border in (True, False):
        cpu_kernels.sample(rng.uniform(0, 255, (n, ch, side, int(rng.integers(1, 9)))).astype(np.float32), theta, border)
    cpu_kernels.residual(thumbs, thumbs[::-1].copy(), theta)
    cpu_kernels.change_exponent_at(thumbs, thumbs, theta, centres, -1e4, 0.1, [3, 5, 7][trial % 3])
    small = int(rng.integers(3, 9))
    crop = rng.integers(0, 256, (small * 2 ** int(rng.integers(0, 4)),) * 2 + (3,), dtype=np.uint8)
    cpu_kernels.thumbnail(crop, small, np.full(5, 0.2, np.float32))
print("ok")
"""
    env = {**os.environ, "NUMBA_BOUNDSCHECK": "1", "NUMBA_CACHE_DIR": str(tmp_path)}  # compiled afresh, checked
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]


def test_the_blend_is_the_warp_then_the_weighted_mean_then_opencvs_rounding():
    rng = np.random.default_rng(3)
    size = 128
    previous = smooth_image(rng, size, size)
    previous[:40, :40], previous[-40:, -40:] = -40, 300  # beyond 0..255: the rounding saturates
    restored = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    weight = rng.uniform(0, 0.9, (32, 32)).astype(np.float32)
    m = WARPS["tracked face, frame to frame"]
    rounded = np.empty_like(restored)
    state = warp_blend(previous, m, weight, restored, rounded)

    upsampled = cv2.resize(weight, (size, size), interpolation=cv2.INTER_LINEAR)[..., None]
    expected = restored + upsampled * (warp_cubic(previous, m) - restored)
    assert np.abs(state - expected).max() < 1e-3
    opencv_rounded = np.empty_like(restored)
    cv2.add(state, 0.0, dst=opencv_rounded, dtype=cv2.CV_8U)  # to nearest, ties to even, saturated
    assert np.array_equal(rounded, opencv_rounded)
    assert (rounded == 0).any() and (rounded == 255).any()


@pytest.mark.parametrize("size, weight_side, bands", [(128, 32, 2), (97, 13, 3), (64, 128, 5), (5, 3, 5)])
def test_a_crop_in_bands_of_rows_is_the_crop_in_one_go(size, weight_side, bands):
    """Threads may share one crop by rows: each band writes its rows, exactly as the whole does,
    and nothing else."""
    rng = np.random.default_rng(size)
    previous = smooth_image(rng, size, size)
    restored = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    weight = rng.uniform(0, 0.9, (weight_side, weight_side)).astype(np.float32)
    m = rotation(size, 4.0, 0.97, (1.3, -2.2))
    whole_rounded = np.empty_like(restored)
    whole = warp_blend(previous, m, weight, restored, whole_rounded)
    warped = warp_cubic(previous, m)
    state, rounded = np.full_like(previous, -7), np.full_like(restored, 7)
    warped_bands = np.full_like(previous, -7)
    cuts = np.linspace(0, size, bands + 1).astype(int)
    for top, bottom in zip(cuts[:-1], cuts[1:]):
        warp_blend(previous, m, weight, restored, rounded, out=state, rows=(top, bottom))
        warp_cubic(previous, m, out=warped_bands, rows=(top, bottom))
    assert np.array_equal(state, whole) and np.array_equal(rounded, whole_rounded)
    assert np.array_equal(warped_bands, warped)
    state[:], rounded[:] = -7, 7
    warp_blend(previous, m, weight, restored, rounded, out=state, rows=(1, size - 1))
    assert (state[0] == -7).all() and (state[-1] == -7).all() and (rounded[0] == 7).all() and (rounded[-1] == 7).all()
    assert np.array_equal(state[1:-1], whole[1:-1]) and np.array_equal(rounded[1:-1], whole_rounded[1:-1])


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_the_blend_takes_the_restored_crop_as_whole_numbers_in_a_float_type(dtype):
    """A model's output may stay in its run dtype: the same numbers blend the same."""
    rng = np.random.default_rng(8)
    previous = smooth_image(rng, 48, 48)
    restored = rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)
    weight = rng.uniform(0, 0.9, (16, 16)).astype(np.float32)
    m = WARPS["near identity"]
    expected_rounded, rounded = np.empty_like(restored), np.empty_like(restored)
    expected = warp_blend(previous, m, weight, restored, expected_rounded)
    got = warp_blend(previous, m, weight, restored.astype(dtype), rounded)
    assert np.array_equal(got, expected) and np.array_equal(rounded, expected_rounded)


def test_the_blend_rounds_ties_to_even_and_saturates():
    values = np.array([20.5, 21.5, -3.5, -0.4, 254.5, 255.5, 300.2, 0.5, 1.5, 7.49], np.float32)
    previous = np.ascontiguousarray(np.tile(values, (4, 1))[..., None])
    restored = np.zeros(previous.shape, np.uint8)  # with weight 1 the state is the warped previous
    rounded = np.empty_like(restored)
    state = warp_blend(previous, WARPS["identity"], np.ones((2, 2), np.float32), restored, rounded)
    assert np.array_equal(state, previous)
    assert rounded[0, :, 0].tolist() == [20, 22, 0, 0, 254, 255, 255, 0, 2, 7]
    rounded[:] = 7
    warp_blend(np.full(previous.shape, np.nan, np.float32), WARPS["identity"], np.ones((2, 2), np.float32), restored,
               rounded)
    assert not rounded.any()  # NaN rounds to 0, as OpenCV's conversion did (converting it is undefined in C)


def test_the_kernels_refuse_what_they_cannot_do():
    src = np.zeros((8, 8, 3), np.float32)
    restored = np.zeros((8, 8, 3), np.uint8)
    weight = np.zeros((4, 4), np.float32)
    identity = WARPS["identity"]
    with pytest.raises(ValueError, match="float32"):
        warp_cubic(src.astype(np.float64), identity)
    with pytest.raises(ValueError, match="overlap"):
        warp_cubic(src, identity, out=src)
    with pytest.raises(ValueError, match="finite"):
        warp_cubic(src, np.array([[np.nan, 0, 0], [0, 1, 0]]))
    with pytest.raises(ValueError, match="2x3"):
        warp_cubic(src, np.eye(2))
    with pytest.raises(ValueError, match="out must be"):
        warp_cubic(src, identity, out=np.zeros((8, 8, 3)))
    with pytest.raises(ValueError, match="restored"):
        warp_blend(src, identity, weight, restored[:4], np.empty_like(restored))
    with pytest.raises(ValueError, match="weight"):
        warp_blend(src, identity, weight[None], restored, np.empty_like(restored))
    with pytest.raises(ValueError, match="rounded"):
        warp_blend(src, identity, weight, restored, np.empty((8, 8, 3), np.float32))
    for rows in ((-1, 4), (5, 4), (0, 9)):
        with pytest.raises(ValueError, match="rows"):
            warp_blend(src, identity, weight, restored, np.empty_like(restored), rows=rows)
    from workers import cpu_kernels

    # the registration's kernels size their work arrays from square thumbnails
    wide, eye = np.zeros((1, 1, 4, 64), np.float32), np.eye(3, dtype=np.float32)[None]
    with pytest.raises(ValueError, match="gauss_newton takes"):
        cpu_kernels.gauss_newton(eye, wide, wide, 1, np.zeros(4, np.float32), 1e-6, 0.1, 1.0, 0.1)
    with pytest.raises(ValueError, match="change_exponent_at takes"):
        cpu_kernels.change_exponent_at(wide, wide, eye, np.zeros(4, np.float32), -1e4, 0.1, 3)
    with pytest.raises(ValueError, match="residual takes"):
        cpu_kernels.residual(wide, wide[..., :32], eye)
    with pytest.raises(ValueError, match="sample takes"):
        cpu_kernels.sample(wide, eye[0], True)


@pytest.mark.parametrize("side", [1, 2, 5, 32])
def test_the_normal_equations_are_the_torch_ones(side):
    """The Gauss-Newton step's sums in one numba pass, against the torch ops a GPU runs."""
    import torch

    from workers import temporal

    rng = np.random.default_rng(side)
    n = 3
    warped = torch.from_numpy(rng.uniform(0, 255, (n, 1, side, side)).astype(np.float32))
    sources = torch.from_numpy(rng.uniform(-1.3, 1.3, (n, 2, side, side)).astype(np.float32))  # some outside
    target = torch.from_numpy(rng.uniform(0, 255, (n, 1, side, side)).astype(np.float32))
    c = temporal._centres(side, torch.device("cpu"))
    columns = torch.empty((n, 9, side, side))
    columns[:, 8:] = target
    expected = temporal._normal_equations(warped, sources, c, columns).double().numpy()
    got = normal_equations(warped.numpy(), sources.numpy(), c.numpy(), target.numpy())
    assert got.shape == (n, 8, 9) and got.dtype == np.float32
    scale = np.abs(expected).max(axis=(1, 2), keepdims=True)
    assert np.abs(got - expected).max() <= 1e-5 * scale.max()
    assert np.array_equal(got[:, :, :8], got[:, :, :8].transpose(0, 2, 1))  # symmetric, as it must be


def test_the_gauss_newton_update_is_the_damped_solve_then_the_composed_step():
    """The registration's small maths in one numba pass, against numpy: damp the diagonal,
    solve, bound the gain, compose theta with the step; how far the corners moved; a singular
    system gives a non-finite warp, not an error."""
    from workers import cpu_kernels

    rng = np.random.default_rng(14)
    n, damping, min_gain, scale = 5, 1e-6, 0.1, 4 / 128
    basis = rng.normal(0, 1, (n, 40, 8))
    lhs = basis.transpose(0, 2, 1) @ basis  # symmetric positive definite, as normal equations are
    rhs = rng.normal(0, 1, (n, 8, 1))
    rhs[1, 6] = -5 * abs(rhs[1, 6]) - lhs[1, 6].sum()  # some gain below min_gain: the bound applies
    normal = np.concatenate([lhs, rhs], axis=2).astype(np.float32)
    normal[4] = 0  # flat images: damping alone, which solves to no step
    theta = (np.eye(3) + rng.normal(0, 0.05, (n, 3, 3)) * [[1, 1, 1], [1, 1, 1], [0, 0, 0]]).astype(np.float32)

    got, moved = cpu_kernels.gauss_newton_update(theta, normal, damping, min_gain, scale)
    damped = normal[..., :8].astype(np.float64)
    damped[:, range(8), range(8)] = normal[:, range(8), range(8)] * np.float32(1 + damping) + np.float32(damping)
    solution = np.linalg.solve(damped[:4], normal[:4, :, 8:].astype(np.float64))[..., 0]
    step = solution[:, :6] / np.maximum(solution[:, 6:7], min_gain) * scale
    update = np.tile(np.eye(3), (4, 1, 1))
    update[:, :2] += step.reshape(4, 2, 3)
    expected = theta[:4].astype(np.float64) @ update
    assert got.shape == (n, 3, 3) and got.dtype == np.float32 and moved.shape == (n,)
    assert np.abs(got[:4] - expected).max() < 1e-5
    assert solution[1, 6] < min_gain  # the case the bound is for
    corners = np.array([[-1, 1, -1, 1], [-1, -1, 1, 1], [1, 1, 1, 1]])
    assert np.allclose(moved[:4], np.abs((expected - theta[:4]) @ corners)[:, :2].max(axis=(1, 2)), rtol=1e-3)
    assert np.array_equal(got[4], theta[4]) and moved[4] == 0
    singular, _ = cpu_kernels.gauss_newton_update(theta[4:], normal[4:], 0.0, min_gain, scale)  # no damping
    assert not np.isfinite(singular).all()


@pytest.mark.parametrize("size, side", [(128, 128), (256, 128), (512, 128), (2048, 128), (24, 3), (40, 5)])
def test_the_thumbnail_is_opencvs_area_mean_then_gaussian(size, side):
    """One numba pass from the uint8 crop against what the blender ran before: OpenCV's
    INTER_AREA resize and 5-tap Gaussian (BORDER_REFLECT_101) on the float crop."""
    from workers import cpu_kernels, temporal

    rng = np.random.default_rng(size + side)
    crop = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    taps = temporal._gaussian_taps().astype(np.float32)
    expected = cv2.GaussianBlur(cv2.resize(crop.astype(np.float32), (side, side), interpolation=cv2.INTER_AREA),
                                (5, 5), temporal.LOWPASS_SIGMA).transpose(2, 0, 1)
    got = cpu_kernels.thumbnail(crop, side, taps)
    assert got.shape == (3, side, side) and got.dtype == np.float32
    assert np.abs(got - expected).max() < 1e-4


def test_the_thumbnail_refuses_what_it_does_not_fit():
    from workers import cpu_kernels

    taps = np.full(5, 0.2, np.float32)
    for shape, side in [((384, 384, 3), 128), ((256, 256, 4), 128), ((256, 128, 3), 128), ((4, 4, 3), 2)]:
        assert not cpu_kernels.thumbnail_fits(shape, side)
        with pytest.raises(ValueError, match="thumbnail takes"):
            cpu_kernels.thumbnail(np.zeros(shape, np.uint8), side, taps)
    with pytest.raises(ValueError, match="thumbnail takes"):
        cpu_kernels.thumbnail(np.zeros((256, 256, 3), np.float32), 128, taps)


@pytest.mark.parametrize("dilate", [1, 3, 5])
def test_the_change_map_is_the_torch_one(dilate, monkeypatch):
    """Coverage, the per-pixel change, its dilation and the weight: numba against torch."""
    import torch

    from workers import cpu_kernels, temporal

    rng = np.random.default_rng(11)
    cur = torch.from_numpy(rng.uniform(0, 255, (3, 3, 24, 24)).astype(np.float32))
    warped = torch.from_numpy(rng.uniform(0, 255, (3, 4, 24, 24)).astype(np.float32))
    coverage = rng.choice([0.0, 0.3, 1.0], (3, 24, 24), p=[0.01, 0.02, 0.97])  # mostly inside the old crop
    warped[:, 3] = torch.from_numpy(coverage.astype(np.float32))
    warped[:, :3] = cur + torch.from_numpy(rng.normal(0, 8, (3, 3, 24, 24)).astype(np.float32))  # small changes
    monkeypatch.setattr(temporal, "CHANGE_DILATE", dilate)
    expected = temporal._change_weight_torch(warped, cur, 0.85, 0.05).numpy()
    exponent = cpu_kernels.change_exponent(warped.numpy(), cur.numpy(), temporal.OUTSIDE, 0.05, dilate)
    got = 0.85 * np.exp(exponent)
    assert got.shape == expected.shape and np.abs(got - expected).max() < 1e-5
    assert 0.01 < got.max() and got.min() == 0  # both blending and uncovered pixels are in the case


def test_the_change_map_works_out_the_coverage_grid_sample_would_sample():
    """From the sampling positions instead of a sampled channel of ones: the same weights, at
    warps that leave part of the crop uncovered (a shift, a turn, a zoom out)."""
    import torch

    from workers import cpu_kernels, temporal

    rng = np.random.default_rng(15)
    side = 32
    prev = torch.from_numpy(rng.uniform(0, 255, (3, 3, side, side)).astype(np.float32))
    theta = torch.eye(3).repeat(3, 1, 1)
    theta[0, 0, 2] = 0.13  # shifted
    theta[1, :2, :2] = torch.tensor([[0.98, -0.17], [0.17, 0.98]])  # turned
    theta[2, :2, :2] *= 1.1  # zoomed out
    sources = temporal._sources(theta, side)
    grid = sources.permute(0, 2, 3, 1)
    sampled = torch.nn.functional.grid_sample(torch.cat([prev, torch.ones_like(prev[:, :1])], dim=1), grid,
                                              mode="bilinear", padding_mode="zeros", align_corners=False)
    coverage = sampled[:, 3].numpy()
    cur = (sampled[:, :3] + torch.from_numpy(rng.normal(0, 1, prev.shape).astype(np.float32))).contiguous()
    assert ((coverage > 0.01) & (coverage < 0.99)).any() and (coverage == 0).any()  # the edges are in the case
    expected = cpu_kernels.change_exponent(sampled.numpy(), cur.numpy(), temporal.OUTSIDE, 0.05, 3)
    got = cpu_kernels.change_exponent(sampled[:, :3].contiguous().numpy(), cur.numpy(), temporal.OUTSIDE, 0.05, 3,
                                      sources=sources.numpy())
    assert np.abs(np.exp(got) - np.exp(expected)).max() < 1e-5
    assert (np.exp(got) > 0.5).any()  # and blending pixels too
    with pytest.raises(ValueError, match="warped must be"):
        cpu_kernels.change_exponent(sampled.numpy(), cur.numpy(), temporal.OUTSIDE, 0.05, 3, sources=sources.numpy())


SAMPLE_WARPS = {  # normalised, as workers.temporal's registration makes them
    "identity": np.eye(3),
    "sub-pixel shift": np.array([[1.0, 0, 0.013], [0, 1, -0.021], [0, 0, 1]]),
    "tracked face, frame to frame": np.array([[0.9646, 0.0716, -0.0128], [-0.0716, 0.9643, 0.0052], [0, 0, 1]]),
    "large rotation": np.array([[0.82, -0.57, 0.1], [0.57, 0.82, -0.05], [0, 0, 1]]),
    "zoomed out": np.array([[1.3, 0, 0], [0, 1.25, 0], [0, 0, 1]]),
    "mirrored": np.array([[-1.0, 0, 0.02], [0, 1, 0], [0, 0, 1]]),
    "far outside": np.array([[1.0, 0, 4e5], [0, 1, -3e5], [0, 0, 1]]),
}


@pytest.mark.parametrize("name", SAMPLE_WARPS)
@pytest.mark.parametrize("padding", ["border", "zeros"])
@pytest.mark.parametrize("shape", [(2, 1, 128, 128), (1, 3, 32, 32), (2, 3, 5, 9)])
def test_the_bilinear_sample_is_torchs_grid_sample(name, padding, shape):
    """Runs over two source rows, pixels with a tap outside one at a time: grid_sample's values
    (float32 rounding apart) for either padding, on any shape, for warps that cut rows into
    short runs or leave the image."""
    import torch

    from workers import cpu_kernels

    rng = np.random.default_rng(sum(shape))
    images = rng.uniform(0, 255, shape).astype(np.float32)
    theta = np.repeat(SAMPLE_WARPS[name][None].astype(np.float32), shape[0], axis=0)
    h, w = shape[2:]
    centres_x = (np.arange(w) * 2 + 1) / w - 1
    centres_y = (np.arange(h) * 2 + 1) / h - 1
    xs, ys = np.meshgrid(centres_x, centres_y)
    grid = np.stack([theta[:, 0, 0, None, None] * xs + theta[:, 0, 1, None, None] * ys + theta[:, 0, 2, None, None],
                     theta[:, 1, 0, None, None] * xs + theta[:, 1, 1, None, None] * ys + theta[:, 1, 2, None, None]],
                    axis=-1)
    expected = torch.nn.functional.grid_sample(torch.from_numpy(images), torch.from_numpy(grid.astype(np.float32)),
                                               mode="bilinear", padding_mode=padding, align_corners=False).numpy()
    got = cpu_kernels.sample(images, theta, border=padding == "border")
    assert got.shape == images.shape and np.abs(got - expected).max() < 0.01  # of 0..255
    if name == "far outside":
        assert (got == (0 if padding == "zeros" else got[:, :, :1, :1])).all()


def test_a_warp_that_is_not_finite_samples_nan():
    """The registration keeps its start where refining went NaN: its check must see NaN, not a
    border value; and the kernel must read only the image meanwhile."""
    from workers import cpu_kernels

    images = np.ones((3, 1, 8, 8), np.float32)
    theta = np.repeat(np.eye(3, dtype=np.float32)[None], 3, axis=0)
    theta[1, 0, 0] = np.nan
    theta[2, 1, 2] = np.inf
    for border in (True, False):
        got = cpu_kernels.sample(images, theta, border)
        assert (got[0] == 1).all() and np.isnan(got[1:]).all()


def test_the_residual_and_the_change_map_at_warps_are_the_sample_then_the_sums():
    """The registration's scores and the change map sample face by face into a small work
    array: the same numbers as sampling the batch, then summing."""
    from workers import cpu_kernels, temporal

    rng = np.random.default_rng(16)
    prev = rng.uniform(0, 255, (3, 3, 32, 32)).astype(np.float32)
    cur = (prev + rng.normal(0, 4, prev.shape)).astype(np.float32)
    theta = np.stack([SAMPLE_WARPS[name] for name in ("sub-pixel shift", "tracked face, frame to frame",
                                                      "zoomed out")]).astype(np.float32)
    theta[2, 0, 0] = np.nan  # NaN in, NaN out
    expected = cpu_kernels.mean_abs_difference(cpu_kernels.sample(prev, theta, border=True), cur)
    got = cpu_kernels.residual(prev, cur, theta)
    assert np.array_equal(got[:2], expected[:2]) and np.isnan(got[2]) and np.isnan(expected[2])
    theta[2, 0, 0] = 1.25
    cur = (cpu_kernels.sample(prev, theta, border=True) + rng.normal(0, 1, prev.shape)).astype(np.float32)  # aligned
    centres = temporal._centres(32, "cpu").numpy()
    where = cpu_kernels.sources(theta, centres)
    expected = cpu_kernels.change_exponent(cpu_kernels.sample(prev, theta, border=False), cur, -1e4, 0.05, 3, where)
    got = cpu_kernels.change_exponent_at(prev, cur, theta, centres, -1e4, 0.05, 3)
    assert np.array_equal(got, expected)
    assert (got < -100).any() and (got > -1).any()  # the uncovered edge is in the case, and blending pixels


def test_gray_and_the_mean_difference_are_plain_sums():
    from workers import cpu_kernels, temporal

    rng = np.random.default_rng(12)
    thumbs = rng.uniform(0, 255, (2, 3, 9, 7)).astype(np.float32)
    weights = np.array(temporal.GRAY)
    expected = (thumbs * weights.astype(np.float32)[None, :, None, None]).sum(axis=1, keepdims=True)
    assert np.abs(cpu_kernels.gray(thumbs, weights) - expected).max() < 1e-4
    a, b = thumbs[:, :1], thumbs[:, 1:2]
    assert np.allclose(cpu_kernels.mean_abs_difference(a, b), np.abs(a - b).mean(axis=(1, 2, 3)), rtol=1e-6)
    blocks = rng.uniform(0, 255, (2, 3, 8, 6)).astype(np.float32)
    assert np.abs(cpu_kernels.halve(blocks) - blocks.reshape(2, 3, 4, 2, 3, 2).mean(axis=(3, 5))).max() < 1e-4
    with pytest.raises(ValueError, match="even"):
        cpu_kernels.halve(blocks[..., :5])


def test_without_anywhere_to_cache_the_kernels_compile_per_process():
    """A read-only install with no writable home: numba finds no cache location (simulated by
    allowing only the zip-import locator) and the kernels are compiled in the process instead."""
    script = """
import numpy as np
from workers import cpu_kernels
assert type(cpu_kernels._warp_cubic._cache).__name__ == "NullCache"
print(cpu_kernels.warp_cubic(np.ones((6, 6, 3), np.float32), np.eye(3)[:2]).sum())
"""
    import numba

    if not hasattr(numba.config, "CACHE_LOCATOR_CLASSES"):
        pytest.skip("this numba cannot be told where (not) to cache")
    env = {**os.environ, "NUMBA_CACHE_LOCATOR_CLASSES": "ZipCacheLocator"}  # for zipped sources only
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 0 and float(out.stdout) == 108.0, out.stderr[-3000:]


def test_what_a_gpu_runs_runs_on_a_cpu_without_the_kernels(monkeypatch):
    """TemporalBlender(opencv_on_cpu=False) runs on a CPU the torch ops a GPU runs, for
    comparing the two: none of these kernels may stand in for them there."""
    import torch

    from workers import cpu_kernels, temporal

    def refuse(*args, **kwargs):
        raise AssertionError("a numba kernel ran")

    for name in ("warp_blend", "warp_cubic", "normal_equations", "sources", "gray", "mean_abs_difference",
                 "change_exponent", "gauss_newton_update", "gauss_newton", "thumbnail", "halve", "sample", "residual",
                 "change_exponent_at"):
        monkeypatch.setattr(cpu_kernels, name, refuse)
    monkeypatch.setattr(temporal, "warp_blend", refuse)
    rng = np.random.default_rng(13)
    blender = temporal.TemporalBlender(0.85, 0.05, opencv_on_cpu=False)
    crops = torch.from_numpy(rng.integers(0, 256, (2, 64, 64, 3), dtype=np.uint8))
    affines = [np.array([[1.0, 0, 0], [0, 1, 0]]), np.array([[1.0, 0, 0.4], [0, 1, -0.3]])]
    out = blender.blend_batch([("p", 0), ("p", 0)], [0, 1], affines, crops, crops, [False, False])
    assert out.shape == crops.shape
    with pytest.raises(AssertionError, match="numba"):  # and the default does use them
        temporal.TemporalBlender(0.85, 0.05).blend_batch([("p", 0), ("p", 0)], [0, 1], affines, crops, crops,
                                                          [False, False])
