"""What runs differently on a GPU: GPEN in float16 there, the memory model read from CUDA's
allocator, and a worker whose model outputs and temporal state stay on the GPU. Skipped where
no GPU is present (run on a lent one: bench/gpu.sh)."""

import threading
import uuid

import cv2
import numpy as np
import pytest
import torch
import zmq

from gpen import RELEASED_CONFIGS, load_generator
from gpen.testing import deterministic_input, deterministic_state_dict
from streamer.faces.align import alignment
from tests.support.clips import ASTRONAUT_LANDMARKS, astronaut
from workers import wire
from workers.budget import calibrate, calibrate_blend, peak_during, weights_bytes
from workers.restorers import build_restorer
from workers.temporal import TemporalBlender
from workers.worker import Worker

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")
GPU = torch.device("cuda")


@pytest.fixture(scope="module")
def state256():
    return deterministic_state_dict(RELEASED_CONFIGS["GPEN-BFR-256"])


@pytest.mark.parametrize("dtype, mean_tol, max_tol", [(torch.float32, 2e-3, 3e-2), (torch.float16, 5e-3, 6e-2)])
def test_gpen_on_the_gpu_matches_float32_on_the_cpu(state256, dtype, mean_tol, max_tol):
    """float32 there may use TF32 convolutions; float16 keeps the latent path in float32."""
    x = deterministic_input(2, 256, seed=3)
    with torch.inference_mode():
        ref = load_generator(state256)(x)
        out = load_generator(state256, device=GPU, dtype=dtype)(x.to(GPU)).float().cpu()
    diff = (out - ref).abs()
    print(f"GPEN-BFR-256 cuda {dtype} vs cpu float32: mean {diff.mean():.2e}, max {diff.max():.2e}")
    assert torch.isfinite(out).all()
    assert diff.mean() < mean_tol and diff.max() < max_tol, (diff.mean(), diff.max())


def test_the_memory_model_from_cudas_allocator_covers_a_larger_batch(gpen256_weights):
    """Calibrated at batch 4, the model's figure for batch 16 must not fall short of the peak
    CUDA's allocator reports for it (a short figure would let a lease overcommit the GPU)."""
    restorer = build_restorer("GPEN-BFR-256", device=GPU, dtype=torch.float16, weights=gpen256_weights)
    model = calibrate(restorer, GPU, weights=weights_bytes(restorer.model), batch=4)
    crops = np.zeros((16, 256, 256, 3), np.uint8)
    peak = peak_during(lambda: restorer.restore(crops), GPU)
    predicted = model.needed(16) - model.weights
    print(f"batch 16: peak {peak / 2**20:.0f} MiB, predicted {predicted / 2**20:.0f} MiB "
          f"(per crop {model.per_crop / 2**20:.1f} MiB, workspace {model.workspace / 2**20:.0f} MiB)")
    assert model.per_crop > 0
    assert peak <= predicted * 1.05
    assert peak >= predicted * 0.5  # and not so generous that the budget is wasted


def _crops(frames: int, shift_px: float, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(affine, 256 px crop) per frame of a face drifting by ``shift_px`` a frame."""
    rng = np.random.default_rng(seed)
    image = astronaut()
    out = []
    for t in range(frames):
        shift = np.array([shift_px * t, 0.5 * t])
        affine = alignment(ASTRONAUT_LANDMARKS + shift + rng.normal(0, 1.0, ASTRONAUT_LANDMARKS.shape), 256)
        moved = cv2.warpAffine(image, np.float64([[1, 0, shift[0]], [0, 1, shift[1]]]), image.shape[1::-1],
                               flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101)
        out.append((affine, cv2.warpAffine(moved, affine, (256, 256), flags=cv2.INTER_CUBIC)))
    return out


def _restore_tracks(restorer, tracks: list, modes: list[str], blender: TemporalBlender | None = None
                    ) -> tuple[dict, list, int]:
    """Every frame of every track through a worker serving ``restorer``, track t with temporal
    mode ``modes[t]``, every credit kept in use (so the model runs a batch while the last one is
    blended, and a track's consecutive frames can share a batch). Returns {(track, frame):
    restored crop}, the blender's track states at the end and its number of CUDA graphs."""
    context = zmq.Context.instance()
    worker = Worker({restorer.name: restorer}, batch=4, batch_wait_ms=20, context=context,
                    device=str(restorer.device), blender=blender or TemporalBlender(0.85, 0.03))
    endpoint = worker.bind(f"inproc://cuda-{uuid.uuid4().hex}")
    thread = threading.Thread(target=worker.serve, daemon=True)
    thread.start()
    dealer = context.socket(zmq.DEALER)
    dealer.connect(endpoint)
    dealer.send_multipart(wire.encode(wire.Hello(job="gpu")))
    unsent = [(track, frame) for frame in range(len(tracks[0])) for track in range(len(tracks))]
    crops, results = len(unsent), {}

    def send(track: int, frame: int) -> None:
        affine, crop = tracks[track][frame]
        header = wire.Crop(job="gpu", frame=frame, track=track, face=0, model=restorer.name, size=256,
                           shape=crop.shape, affine=tuple(map(tuple, affine.tolist())), temporal=modes[track])
        dealer.send_multipart(wire.encode(header, crop))

    try:
        while len(results) < crops:
            assert dealer.poll(60000), "no reply"
            header, pixels = wire.decode(dealer.recv_multipart())
            if header.kind == "credit":
                for _ in range(min(header.credits, len(unsent))):
                    send(*unsent.pop(0))
                continue
            assert header.kind == "result", header
            results[(header.track, header.frame)] = pixels.copy()
            if unsent:
                send(*unsent.pop(0))  # a result returns its credit
        states = list(worker.blender._tracks.values())
        graphs = len(worker.blender._aligned)
    finally:
        dealer.close(linger=0)
        worker.stop_event.set()
        thread.join(30)
    return results, states, graphs


def test_a_gpu_worker_blends_on_the_gpu_and_matches_a_cpu_worker(gpen256_weights):
    """Three tracks blended and a fourth, the first's crops again, with temporal off: the GPU
    worker (float16, its blend on a stream of its own, graphs captured before it served) gives
    what the CPU worker gives, and blending changed the first track's later frames."""
    tracks = [_crops(4, 1.0, seed) for seed in range(3)]
    tracks.append(tracks[0])
    modes = ["full", "full", "full", "off"]
    gpu = build_restorer("GPEN-BFR-256", device=GPU, dtype=torch.float16, weights=gpen256_weights)
    cpu = build_restorer("GPEN-BFR-256", device=torch.device("cpu"), dtype=torch.float32, weights=gpen256_weights)
    on_gpu, states, graphs = _restore_tracks(gpu, tracks, modes)
    on_cpu, _, _ = _restore_tracks(cpu, tracks, modes)
    assert len(states) == 3
    assert all(s.output.is_cuda and s.lowpass.is_cuda and s.output.dtype == torch.float16 for s in states)
    assert graphs == 4  # one per batch size up to the worker's 4, all captured at its start
    assert on_gpu.keys() == on_cpu.keys() == {(t, f) for t in range(4) for f in range(4)}
    for results in (on_gpu, on_cpu):
        assert np.array_equal(results[(0, 0)], results[(3, 0)])  # a first frame has nothing to blend with
        blended = [np.abs(results[(0, f)].astype(np.float32) - results[(3, f)]).mean() for f in range(1, 4)]
        assert min(blended) > 0.2, blended
    diffs = np.array([np.abs(on_gpu[k].astype(np.float32) - on_cpu[k]).mean() for k in sorted(on_cpu)])
    print(f"GPU worker (float16) vs CPU worker (float32), mean |diff| per crop: {np.round(diffs, 3).tolist()}")
    assert diffs.max() < 1.5  # grey levels out of 255: rounding and fp16, not a different blend


def test_a_blend_on_the_gpu_never_makes_the_host_wait():
    """torch's sync debug mode raises at any operation that waits for the GPU: a blend queues
    its work and returns (the worker's one wait is the copy of its outputs to the host), so the
    blend thread never waits for the model's next batch queued meanwhile. The batches cover
    new tracks, stored states, a track's two frames in one batch and crops picked out of order."""
    crops = _crops(4, 1.0, seed=1)
    inputs = torch.from_numpy(np.stack([c for _, c in crops])).to(GPU)
    restored = inputs.half()
    affines = [a for a, _ in crops]
    blender = TemporalBlender(0.85, 0.03)
    batches = [  # (track, frame) per crop
        [(0, 0), (1, 0)],
        [(0, 1), (0, 2), (1, 1), (2, 0)],
        [(2, 1), (0, 3), (1, 2)],
    ]
    calls = []
    for batch in batches:  # the test's own indexing on the GPU, before the check
        picked = [frame for _, frame in batch]
        calls.append(([("p", "j", track) for track, _ in batch], picked, [affines[f] for f in picked],
                      inputs[picked].contiguous(), restored[picked].contiguous(), [False] * len(batch)))
    warm = [[(9, 0), (10, 0), (11, 0)], [(9, 1), (10, 1), (11, 1)]]  # three registrations: their graph's capture
    for batch in warm:  # synchronises (once per batch size), so it comes first
        picked = [frame for _, frame in batch]
        blender.blend_batch([("p", "w", track) for track, _ in batch], picked, [affines[f] for f in picked],
                            inputs[picked].contiguous(), restored[picked].contiguous(), [False] * 3,
                            run_dtype=torch.float16)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for args in calls:
            out = blender.blend_batch(*args, run_dtype=torch.float16)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert out.is_cuda and out.shape == (3, 256, 256, 3)
    assert len(blender) == 6


def test_cuda_graphs_give_what_the_eager_ops_give():
    """Registration and change map replayed from CUDA graphs (one per number of registrations in
    a batch) against the same ops run eagerly, over batches of 1, 2 and 3 registrations."""
    crops = _crops(6, 1.5, seed=2)
    inputs = torch.from_numpy(np.stack([c for _, c in crops])).to(GPU)
    affines = [a for a, _ in crops]
    batches = [[(0, 0), (1, 0), (2, 0)], [(0, 1)], [(0, 2), (1, 2)], [(0, 3), (1, 3), (2, 3)], [(0, 4), (1, 4), (2, 4)]]
    results = []
    for graphs in (True, False):
        blender = TemporalBlender(0.85, 0.03, cuda_graphs=graphs)
        outs = []
        for batch in batches:
            picked = [frame for _, frame in batch]
            outs.append(blender.blend_batch([("p", "j", t) for t, _ in batch], picked, [affines[f] for f in picked],
                                            inputs[picked].contiguous(), inputs[picked].half(), [False] * len(batch),
                                            run_dtype=torch.float16).cpu())
        results.append(torch.cat(outs))
        if graphs:
            assert len(blender._aligned) == 3  # captured for 1, 2 and 3 registrations (none failed)
    diff = (results[0].float() - results[1].float()).abs()
    print(f"CUDA graphs vs eager: mean |diff| {diff.mean():.2e}, max {diff.max():.0f}")
    assert diff.max() <= 1 and diff.mean() < 1e-3


def test_the_blends_memory_model_counts_its_graphs_and_covers_a_blend():
    """calibrate_blend on a GPU: the state cap plus the CUDA graphs' pool (captured there, one
    graph per batch size), and a per-crop figure that covers a batch of real crops blended."""
    blender = TemporalBlender(0.85, 0.03, max_bytes=64 << 20)
    model = calibrate_blend(blender, GPU, torch.float16, size=256, batch=4)
    assert len(blender._aligned) == 4 and len(blender) == 0
    assert model.weights > 64 << 20  # the graphs' pool on top of the states
    assert model.per_crop >= 256 * 256 * 3 * 2  # a new state's float16 output, at least
    crops = _crops(2, 1.0, seed=4)
    inputs = torch.from_numpy(np.stack([c for _, c in crops] * 2)).to(GPU)
    keys, affines = [("p", "j", t) for t in range(4)], [a for a, _ in crops] * 2

    def blend(frame: int) -> None:
        blender.blend_batch(keys, [frame] * 4, affines, inputs, inputs.half(), [False] * 4, run_dtype=torch.float16)

    blend(0)
    peak = peak_during(lambda: blend(1), GPU)
    predicted = model.needed(4) - model.weights
    print(f"blend of 4 at 256 px: peak {peak / 2**20:.1f} MiB, predicted {predicted / 2**20:.1f} MiB")
    assert peak <= predicted * 1.1


def test_a_graph_that_cannot_be_captured_stops_the_worker_with_the_setting_to_change():
    """A blend that waits for the GPU cannot be captured: the worker stops with an error that
    names worker.cuda_graphs (in a process of its own: a failed capture may leave torch's
    allocator broken for whatever runs after it)."""
    import subprocess
    import sys
    import textwrap
    from pathlib import Path

    script = textwrap.dedent("""
        import threading, torch
        from workers.restorers import build_restorer
        from workers.temporal import TemporalBlender
        from workers.worker import Worker

        class Syncing(TemporalBlender):
            def _align(self, prev, cur, starts, kernels=False):
                theta, weight = super()._align(prev, cur, starts, kernels)
                if weight.sum().item() < 0:  # a host sync: not allowed while capturing
                    raise AssertionError
                return theta, weight

        restorer = build_restorer("standin-0+0ms-64px", device=torch.device("cuda"), dtype=torch.float16)
        worker = Worker({restorer.name: restorer}, batch=2, batch_wait_ms=5, device="cuda",
                        blender=Syncing(0.85, 0.03))
        worker.bind("inproc://capture")
        worker.stop_event.set()  # had the capture passed, serve() would return at once
        try:
            worker.serve()
        except RuntimeError as exc:
            print("SERVE FAILED:", exc, flush=True)
        print("ERROR KEPT:", worker.error is not None, flush=True)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).resolve().parent.parent)
    assert "SERVE FAILED: capturing the temporal blend's CUDA graph" in done.stdout, done.stdout + done.stderr
    assert "worker.cuda_graphs: false" in done.stdout and "ERROR KEPT: True" in done.stdout


def test_a_batch_goes_to_the_gpu_once_for_the_model_and_the_blend():
    """The worker uploads a batch's crops once: the model is given them on the GPU, and the
    blend reads that same memory (a batch with every crop blended: the tensor itself)."""
    from workers.restorers import StandInRestorer

    given, blended = [], []

    class Recording(StandInRestorer):
        def restore_on_device(self, crops):
            given.append(crops)
            return super().restore_on_device(crops)

    class RecordingBlender(TemporalBlender):
        def blend_batch(self, keys, frames, affines, inputs, *args, **kwargs):
            blended.append(inputs)
            return super().blend_batch(keys, frames, affines, inputs, *args, **kwargs)

    restorer = Recording("standin-0+1ms-256px", 256, 0, 1, device=GPU, dtype=torch.float16)
    _restore_tracks(restorer, [_crops(3, 1.0, seed) for seed in range(2)], ["full", "full"],
                    blender=RecordingBlender(0.85, 0.03))
    assert given and len(given) == len(blended)
    assert all(isinstance(c, torch.Tensor) and c.is_cuda for c in given)
    assert all(b.data_ptr() == c.data_ptr() for b, c in zip(blended, given))
