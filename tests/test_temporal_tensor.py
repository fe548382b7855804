"""The tensor temporal blender (workers.temporal) against the OpenCV/ECC one it replaced
(workers.temporal_reference) on the bench's kind of clips; batching; the state rules; and where
the state lives between frames."""

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from streamer.faces.align import alignment
from tests.support.clips import ASTRONAUT_LANDMARKS, astronaut, make_clip, read_frames
from tests.support.clips import TEMPORAL_CLIPS as CLIPS
from tests.support.clips import TEMPORAL_DEGRADE as DEGRADE
from workers import temporal
from workers.temporal import TemporalBlender
from workers.temporal_reference import ReferenceBlender

BLEND = (0.85, 0.03)


def _track(tmp_path, name: str, frames: int, size: int) -> list[tuple]:
    """(affine, degraded crop, clean crop, reset) per frame of a bench-like clip, cropped at the
    jittered landmarks of its --faces file, as the pipeline does."""
    opts = dict(CLIPS[name])
    cut = int(frames * opts.pop("cut_at")) if "cut_at" in opts else None
    clip = make_clip(tmp_path / f"{name}.mp4", frames=frames, face_px=110.0, cut_at=cut, audio=False, **opts,
                     **DEGRADE)
    degraded, *_ = read_frames(clip.path)
    with open(clip.faces_path) as f:
        marks = [np.array(json.loads(line)["faces"][0]["landmarks"]) for line in f]
    track = []
    for t in range(frames):
        affine = alignment(marks[t], size)
        crop, clean = (cv2.warpAffine(img, affine, (size, size), flags=cv2.INTER_CUBIC)
                       for img in (degraded[t], clip.clean[t]))
        track.append((affine, crop, clean, t == cut))
    return track


def _blend(blender, track) -> list[np.ndarray]:
    return [blender.blend(("peer", "job", 0), t, affine, crop, crop, reset=reset).astype(float)
            for t, (affine, crop, _, reset) in enumerate(track)]


def _face(img: np.ndarray) -> np.ndarray:
    s = img.shape[0]
    return img[s // 4:3 * s // 4, s // 4:3 * s // 4]


def _temporal_error(outs, track) -> float:
    """bench/temporal.py's TE in crop space: mean |(out_t - out_t-1) - (clean_t - clean_t-1)|."""
    clean = [c.astype(float) for _, _, c, _ in track]
    return float(np.mean([_face(np.abs((outs[t] - outs[t - 1]) - (clean[t] - clean[t - 1]))).mean()
                          for t in range(1, len(outs)) if not track[t][3]]))


def _psnr(outs, track) -> float:
    mse = np.mean([(_face(o - c) ** 2).mean() for o, (_, _, c, _) in zip(outs, track)])
    return float(10 * np.log10(255**2 / mse))


def _compare(tmp_path, name: str, frames: int, size: int, tolerance: float) -> None:
    track = _track(tmp_path, name, frames, size)
    reference, tensor = _blend(ReferenceBlender(*BLEND), track), _blend(TemporalBlender(*BLEND), track)
    off = [crop.astype(float) for _, crop, _, _ in track]
    assert abs(_temporal_error(tensor, track) - _temporal_error(reference, track)) <= tolerance
    assert abs(_psnr(tensor, track) - _psnr(reference, track)) <= tolerance
    assert np.mean([np.abs(a - b).mean() for a, b in zip(tensor, reference)]) < 0.75  # levels of 255
    assert _psnr(tensor, track) > _psnr(off, track) - 0.2  # no ghosts: never much worse than no blending
    for t, (_, crop, _, reset) in enumerate(track):
        if reset:  # after a cut nothing of the old shot is left
            assert np.array_equal(tensor[t], crop)


@pytest.mark.parametrize("name", ["static", "slow", "cut", "occluder"])
def test_the_tensor_blender_measures_like_the_one_it_replaced(tmp_path, name):
    _compare(tmp_path, name, frames=16, size=256, tolerance=0.1)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CLIPS))
def test_the_tensor_blender_measures_like_the_one_it_replaced_on_the_bench_clips(tmp_path, name):
    _compare(tmp_path, name, frames=40, size=512, tolerance=0.03)


def _jittered_crops(frames: int, size: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(frames):
        affine = alignment(ASTRONAUT_LANDMARKS + rng.normal(0, 1.5, ASTRONAUT_LANDMARKS.shape), size)
        crop = cv2.warpAffine(astronaut(), affine, (size, size), flags=cv2.INTER_CUBIC)
        out.append((affine, np.clip(crop + rng.normal(0, 6, crop.shape), 0, 255).astype(np.uint8)))
    return out


# (track, frame, reset): consecutive frames of one track in one batch, a reset, a gap of more
# than MAX_FRAME_GAP frames and one of just that, an interleaved second track, a frame going backwards
BATCH = [(0, 0, False), (1, 0, False), (0, 1, False), (0, 2, False), (1, 1, False), (0, 3, True), (0, 4, False),
         (0, 9, False), (1, 4, False), (1, 6, False), (0, 10, False), (0, 8, False)]


def _batch_inputs(size: int = 96):
    crops = _jittered_crops(len(BATCH), size, seed=1)
    keys = [("peer", "job", track) for track, _, _ in BATCH]
    frames = [frame for _, frame, _ in BATCH]
    resets = [reset for _, _, reset in BATCH]
    return keys, frames, resets, [a for a, _ in crops], np.stack([c for _, c in crops])


def test_a_batch_gives_what_its_crops_give_one_at_a_time():
    keys, frames, resets, affines, crops = _batch_inputs()
    one_by_one = TemporalBlender(*BLEND)
    singles = [one_by_one.blend(k, f, a, c, c, reset=r) for k, f, a, c, r in zip(keys, frames, affines, crops, resets)]
    batched = TemporalBlender(*BLEND)
    first = batched.blend_batch(keys[:5], frames[:5], affines[:5], torch.from_numpy(crops[:5]),
                                torch.from_numpy(crops[:5]), resets[:5])
    rest = batched.blend_batch(keys[5:], frames[5:], affines[5:], torch.from_numpy(crops[5:]),
                               torch.from_numpy(crops[5:]), resets[5:])
    assert np.array_equal(np.concatenate([first.numpy(), rest.numpy()]), np.stack(singles))
    assert len(batched) == len(one_by_one) == 2


def test_reused_state_memory_never_belongs_to_a_live_track():
    # a replaced state's output is reused for later states (fresh memory costs more than the
    # maths on a CPU): batches of changing tracks against one blender per track
    tracks = {t: _jittered_crops(6, 96, seed=10 + t) for t in range(3)}
    batches = [[(0, 0), (1, 0)], [(0, 1), (2, 0), (0, 2)], [(1, 1), (2, 1)], [(1, 2), (2, 2), (0, 3)],
               [(2, 3), (0, 4), (2, 4)], [(2, 5), (0, 5), (1, 3)]]
    shared, alone = TemporalBlender(*BLEND), {t: TemporalBlender(*BLEND) for t in tracks}
    reused = set()
    for batch in batches:
        before = {state.output.data_ptr() for state in shared._tracks.values()}
        crops = torch.from_numpy(np.stack([tracks[t][f][1] for t, f in batch]))
        out = shared.blend_batch([("peer", "job", t) for t, _ in batch], [f for _, f in batch],
                                 [tracks[t][f][0] for t, f in batch], crops, crops, [False] * len(batch))
        for (t, f), blended in zip(batch, out.numpy()):
            affine, crop = tracks[t][f]
            assert np.array_equal(blended, alone[t].blend(("peer", "job", t), f, affine, crop, crop)), (t, f)
        reused |= {state.output.data_ptr() for state in shared._tracks.values()} & before
    assert reused  # the memory was reused, and what it held before did not leak into another track


def test_the_memory_kept_for_reuse_goes_with_the_last_track():
    keys, frames, resets, affines, crops = _batch_inputs()
    blender = TemporalBlender(*BLEND)
    for part in (slice(0, 5), slice(5, None)):
        blender.blend_batch(keys[part], frames[part], affines[part], torch.from_numpy(crops[part]),
                            torch.from_numpy(crops[part]), resets[part])
    assert blender._spares
    blender.drop(("peer", "job", 0))
    assert blender._spares  # track 1 is still there
    blender.drop(("peer",))
    assert len(blender) == 0 and not blender._spares


def test_the_blend_refuses_memory_it_cannot_write_into():
    (affine, crop), = _jittered_crops(1, 32, seed=5)
    previous, weight = crop.astype(np.float32), np.full((8, 8), 0.5, np.float32)
    with pytest.raises(ValueError, match="float32"):
        temporal._blend_on_cpu(previous, np.eye(3), weight, crop, np.empty_like(crop), out=np.empty(crop.shape))


def test_the_grids_a_gpu_builds_are_the_grids_a_cpu_builds():
    theta = torch.eye(3).repeat(4, 1, 1) + torch.randn(4, 3, 3, generator=torch.Generator().manual_seed(7)) * 0.05
    for side in (32, 128):
        assert torch.allclose(temporal._sources(theta, side), temporal._sources_summed(theta, side), atol=1e-6)


def test_a_track_whose_crops_change_size_starts_afresh():
    blender = TemporalBlender(*BLEND)
    (a0, c0), = _jittered_crops(1, 96, seed=2)
    (a1, c1), = _jittered_crops(1, 128, seed=3)
    blender.blend(("peer", "job", 0), 0, a0, c0, c0)
    assert np.array_equal(blender.blend(("peer", "job", 0), 1, a1, c1, c1), c1)


def test_splitting_a_batch_over_threads_gives_what_one_thread_gives():
    keys, frames, resets, affines, crops = _batch_inputs()
    outs, states = [], []
    for threads in (1, 2, 3):
        blender = TemporalBlender(*BLEND, cpu_threads=threads)
        outs.append(np.concatenate([blender.blend_batch(keys[s], frames[s], affines[s], torch.from_numpy(crops[s]),
                                                        torch.from_numpy(crops[s]), resets[s]).numpy()
                                    for s in (slice(0, 7), slice(7, None))]))
        states.append({key: state.output for key, state in blender._tracks.items()})
    for out, state in zip(outs[1:], states[1:]):
        assert np.array_equal(out, outs[0])
        assert all(torch.equal(state[key], states[0][key]) for key in states[0])


@pytest.mark.parametrize("crops", [1, 3])
def test_threads_share_crops_they_cannot_divide_by_rows(crops):
    """A batch of one face (or three on two threads) goes in bands of rows, two per crop on two
    threads: the same outputs and states as one thread."""
    jittered = _jittered_crops(2 * crops, 96, seed=5)
    keys = [("peer", "job", track) for track in range(crops)]
    first = [jittered[2 * t] for t in range(crops)]
    second = [jittered[2 * t + 1] for t in range(crops)]
    outs, states, bands = [], [], []
    for threads in (1, 2):
        blender = TemporalBlender(*BLEND, cpu_threads=threads)
        crops_0 = torch.from_numpy(np.stack([c for _, c in first]))
        blender.blend_batch(keys, [0] * crops, [a for a, _ in first], crops_0, crops_0, [True] * crops)
        seen = []
        original = temporal.warp_blend

        def counting(*args, seen=seen, original=original):
            seen.append(args[6])  # rows
            return original(*args)

        temporal.warp_blend = counting
        try:
            crops_1 = torch.from_numpy(np.stack([c for _, c in second]))
            restored = torch.from_numpy(np.ascontiguousarray(crops_1.numpy()[:, :, ::-1]))
            outs.append(blender.blend_batch(keys, [1] * crops, [a for a, _ in second], crops_1, restored,
                                            [False] * crops).numpy())
        finally:
            temporal.warp_blend = original
        bands.append(sorted(seen))
        states.append({key: state.output for key, state in blender._tracks.items()})
    assert np.array_equal(outs[1], outs[0])
    assert all(torch.equal(states[1][key], states[0][key]) for key in states[0])
    assert bands[0] == [(0, 96)] * crops
    assert bands[1] == [(0, 48)] * crops + [(48, 96)] * crops


def test_the_blend_helpers_run_torch_on_one_thread_and_leave_the_default_alone():
    # in a process of its own: the default is process-wide, and threads other tests left behind
    # (workers, other blenders' helpers) could change it meanwhile
    import subprocess
    import sys

    script = """
import torch
from concurrent.futures import ThreadPoolExecutor
from workers.temporal import TemporalBlender
torch.set_num_threads(2)
blender = TemporalBlender(0.85, 0.03, cpu_threads=2)
helper = blender._helpers.submit(torch.get_num_threads).result()
with ThreadPoolExecutor(1) as fresh:  # a thread started afterwards gets the process-wide default
    print(helper, fresh.submit(torch.get_num_threads).result())
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["1", "2"]




def test_a_batch_keeps_the_state_rules():
    keys, frames, resets, affines, crops = _batch_inputs()
    out = TemporalBlender(*BLEND).blend_batch(keys, frames, affines, torch.from_numpy(crops),
                                              torch.from_numpy(crops), resets).numpy()
    fresh = [0, 1, 5, 7, 8, 11]  # first frames, the reset, after gaps of 3 and 5, and going backwards
    for i in range(len(BATCH)):
        assert np.array_equal(out[i], crops[i]) == (i in fresh), BATCH[i]


def test_a_drop_waits_for_crops_in_the_model():
    blender = TemporalBlender(*BLEND)
    (a0, c0), (a1, c1) = _jittered_crops(2, 96, seed=2)
    blender.blend(("peer", "job", 7), 0, a0, c0, c0)
    blender.blend(("peer", "job", 8), 0, a0, c0, c0)
    blender.hold([("peer", "job", 7)])
    blender.drop(("peer", "job", 7))  # end of track overtakes its last crop
    blender.drop(("peer", "job", 8))
    assert len(blender) == 1
    assert not np.array_equal(blender.blend(("peer", "job", 7), 1, a1, c1, c1), c1)  # still blended
    blender.release([("peer", "job", 7)])
    assert len(blender) == 0
    blender.blend(("peer", "job", 7), 2, a1, c1, c1)
    assert len(blender) == 1  # the deferred drop is spent


def test_what_a_gpu_runs_gives_what_a_cpu_runs():
    """The batched torch path, run on the CPU, against the per-crop OpenCV one, over batches
    with consecutive frames of a track, a reset and gaps."""
    keys, frames, resets, affines, crops = _batch_inputs(size=128)
    outs = []
    for blender in (TemporalBlender(*BLEND), TemporalBlender(*BLEND, opencv_on_cpu=False)):
        outs.append(np.concatenate([blender.blend_batch(keys[s], frames[s], affines[s], torch.from_numpy(crops[s]),
                                                        torch.from_numpy(crops[s]), resets[s]).numpy()
                                    for s in (slice(0, 6), slice(6, None))]).astype(float))
    diff = np.abs(outs[0] - outs[1])
    assert diff.mean() < 0.01 and diff.max() <= 1


def _thumbnail_pairs(n: int = 6, size: int = 128):
    """Thumbnails of consecutive jittered crops, and blend_batch's two starts for each pair."""
    crops = _jittered_crops(n + 1, size, seed=11)
    thumbs = temporal.thumbnails(torch.from_numpy(np.stack([c for _, c in crops])), opencv=True)
    to_norm, from_norm = temporal._normalising(size)
    starts = [[np.eye(3), to_norm @ temporal._as3x3(crops[i][0]) @ np.linalg.inv(temporal._as3x3(crops[i + 1][0]))
               @ from_norm] for i in range(n)]
    return thumbs[:n], thumbs[1:], torch.as_tensor(np.array(starts), dtype=torch.float32)


def test_registration_on_a_cpu_finds_the_warps_the_torch_ops_find():
    """The CPU's registration (numba sums and small solves, the identity start not
    sampled) against the torch ops a GPU runs: the same warps to float32 rounding, also where a
    pair is flat (nothing to register: the start stays) or a start is NaN (never chosen)."""
    prev, cur, starts = _thumbnail_pairs()
    prev[2], cur[2] = 100.0, 100.0  # flat: the normal equations are damping only
    starts[4, 1] = float("nan")
    cpu = temporal.register(prev, cur, starts)
    gpu = temporal.register(prev, cur, starts, kernels=False)
    assert torch.isfinite(cpu).all() and (cpu - gpu).abs().max() < 1e-5
    assert any(torch.equal(cpu[2], start) for start in starts[2])  # nothing to refine: a start
    moved = [i for i in range(len(cpu)) if i != 2]
    refined = [i for i in moved if min((cpu[i] - start).abs().max() for start in starts[i]) > 5e-5]
    assert len(refined) >= 2  # the steps ran (where refining made it worse, the start stays)


def test_sampling_a_thumbnail_at_the_identity_gives_the_thumbnail():
    """Why the CPU's registration need not sample its identity start: at a power-of-two side the
    pixel centres map onto pixels exactly, so grid_sample returns the image bit for bit."""
    prev, cur, _ = _thumbnail_pairs(3)
    gray = temporal._gray(prev, kernels=False)
    for side in (32, 64, 128):
        image = torch.nn.functional.interpolate(gray, size=side, mode="area")
        for kernels in (True, False):  # the positions from numba's kernel (what the CPU skips) and torch's
            same = temporal._sample(image, torch.eye(3).repeat(len(image), 1, 1), "border", kernels=kernels)
            assert torch.equal(same, image)


def test_a_warp_gone_nan_in_a_batch_leaves_the_other_warps_alone():
    """The CPU's steps solve the batch's systems in one numba call: a NaN one stays NaN (register
    then keeps that pair's start) and the others register as torch's steps do."""
    prev, cur, starts = _thumbnail_pairs(4)
    gray_prev, gray_cur = temporal._gray(prev, kernels=False), temporal._gray(cur, kernels=False)
    theta = starts[:, 1].clone()
    theta[1] = float("nan")
    cpu = temporal._gauss_newton_on_cpu(theta.numpy(), gray_prev.numpy(), gray_cur.numpy(), 2)
    gpu = temporal._gauss_newton(theta, gray_prev, gray_cur, 2)
    assert np.isnan(cpu[1]).all()
    others = [0, 2, 3]
    assert np.isfinite(cpu[others]).all() and np.abs(cpu[others] - gpu[others].numpy()).max() < 1e-5


def test_a_face_whose_step_converged_takes_no_more_steps_at_that_level():
    """A Gauss-Newton step that moved a face's corners less than CONVERGED_PX is its last at
    that level, on a CPU's path and the torch one alike; the other faces go on stepping."""
    prev, cur, starts = _thumbnail_pairs(4)
    gray_prev, gray_cur = temporal._gray(prev, kernels=False), temporal._gray(cur, kernels=False)
    gray_cur[0] = gray_prev[0]  # the same image: the first step moves (next to) nothing
    theta = starts[:, 1].clone()
    theta[0] = torch.eye(3)
    theta[1:, :2, 2] += 3 / temporal.LOWPASS_SIZE  # 1.5 px off: steps to take
    one = temporal._gauss_newton_on_cpu(theta.numpy(), gray_prev.numpy(), gray_cur.numpy(), 1)
    three = temporal._gauss_newton_on_cpu(theta.numpy(), gray_prev.numpy(), gray_cur.numpy(), 3)
    moved = temporal.corners_moved(torch.from_numpy(one), theta) * temporal.LOWPASS_SIZE / 2
    assert moved[0] < temporal.CONVERGED_PX and (moved[1:] >= temporal.CONVERGED_PX).all()  # the case
    assert np.array_equal(three[0], one[0])  # stopped after its first step
    assert all(np.abs(three[i] - one[i]).max() > 1e-6 for i in range(1, 4))  # took the others
    on_torch = temporal._gauss_newton(theta, gray_prev, gray_cur, 3)
    assert np.abs(on_torch.numpy() - three).max() < 1e-5


def test_the_torch_kernels_agree_with_the_opencv_ones():
    """What a GPU runs (torch, batched) against what a CPU runs (OpenCV, crop by crop)."""
    size = 256
    (_, crop), (_, previous) = _jittered_crops(2, size, seed=3)
    crops = torch.from_numpy(np.stack([crop, previous]))
    assert (temporal._thumbnails_torch(crops) - temporal.thumbnails(crops, opencv=True)).abs().max() < 1e-3
    theta = np.array([[0.99, 0.02, 0.013], [-0.015, 1.01, -0.02], [0, 0, 1]])
    weight = np.random.default_rng(4).uniform(0, 0.85, (1, 1, temporal.LOWPASS_SIZE, temporal.LOWPASS_SIZE))
    weight = weight.astype(np.float32)
    state = previous.astype(np.float32)
    cpu = temporal._blend_on_cpu(state, theta, weight[0, 0], crop, np.empty_like(crop))
    gpu_way = temporal._blend_batched(torch.from_numpy(state[None]), torch.tensor(theta[None], dtype=torch.float32),
                                      torch.from_numpy(weight), torch.from_numpy(crop[None]), torch.float32)[0].numpy()
    inner = slice(8, -8)  # the two repeat the border in their own ways
    diff = np.abs(cpu - gpu_way)[inner, inner]
    assert diff.mean() < 0.05 and diff.max() < 3  # OpenCV places samples to 1/32 pixel


def _device_run(device: torch.device, dtype: torch.dtype):
    crops = _jittered_crops(6, 128, seed=5)
    blender = TemporalBlender(*BLEND)
    outs = []
    for step in range(3):  # two tracks, frames in pairs: later calls start from stored states
        picked = crops[2 * step:2 * step + 2]
        x = torch.from_numpy(np.stack([c for _, c in picked])).to(device)
        outs.append(blender.blend_batch([("p", "j", 0), ("p", "j", 0)], [2 * step, 2 * step + 1],
                                        [a for a, _ in picked], x, x.to(dtype), [False, False], run_dtype=dtype))
    return blender, outs


def test_the_state_never_leaves_the_device():
    """On the meta device, where tensors have no data, anything that brought the state (or any
    tensor) back to the host between or within frames would raise."""
    blender, outs = _device_run(torch.device("meta"), torch.float16)
    assert all(o.device.type == "meta" and o.dtype == torch.uint8 for o in outs)
    assert len(blender) == 1
    for state in blender._tracks.values():
        assert state.output.device.type == "meta" and state.lowpass.device.type == "meta"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_on_a_gpu_the_state_stays_there_and_the_result_matches_the_cpu(dtype):
    blender, outs = _device_run(torch.device("cuda"), dtype)
    for state in blender._tracks.values():
        assert state.output.is_cuda and state.lowpass.is_cuda
        assert state.output.dtype == temporal.blend_dtype(torch.device("cuda"), dtype)
    _, cpu = _device_run(torch.device("cpu"), torch.float32)
    for gpu_out, cpu_out in zip(outs, cpu):
        diff = (gpu_out.cpu().float() - cpu_out.float()).abs()
        assert diff.mean() < 0.3 and diff.max() < 12
