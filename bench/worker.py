"""A worker's throughput with temporal blending off vs full, and the blend's own cost, from one
run.

throughput  the real Worker (receive loop, model thread, blender) in a thread, serving a stand-in
            model that sleeps a fixed time per face (so, like a GPU, it leaves the CPU to the
            rest), fed over inproc:// by a client that keeps every credit in use: 8 tracks of
            512 px faces with landmark jitter and noise. Faces per second with --temporal off and
            full, per model latency and batch size; "full/off" is the ratio; "full, ref" is full
            with the blender the tensor one replaced.
blend       the batched blend alone on the same kind of crops, batch 16 (and at 512 px, batch 1:
            one face per call, as a worker at batch 1 blends), in a thread set up as
            the worker's blend thread (torch on one thread, OpenCV on its own; on a CPU the
            blender splits each batch between that thread and its own helper, as in the worker):
            ms per face at 256 and 512 px for the tensor blender and, for reference, the
            OpenCV/ECC one it replaced (workers.temporal_reference, one crop at a time):
            the median of --blend-rounds rounds, the two measured in turn in each (a shared
            machine's speed drifts within minutes; taking turns keeps the ratio fair).

On a CPU the blend and the worker's other threads share the cores with the client; the model
stand-in does not use them. On a GPU (--device cuda, the default where one is present) the
stand-in leaves its outputs on the GPU in float16, as GPEN does there, and the blend runs there;
the reference blender is CPU-only (its column is left out); --gpen adds the throughput with the
real GPEN-BFR-512 (deterministic weights, float16 on CUDA) as the model.

    python bench/worker.py
    python bench/worker.py --threads 1                    # torch and OpenCV on one thread
    python bench/worker.py --seconds 2 --latencies 1 --batches 4
    python bench/worker.py --latencies                    # the blend only
    python bench/worker.py --device cuda --gpen           # on a GPU, with GPEN-BFR-512 too
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.support, beside bench/

import argparse  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
import uuid  # noqa: E402
from concurrent.futures import ThreadPoolExecutor  # noqa: E402

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import zmq  # noqa: E402

from gpen import RELEASED_CONFIGS  # noqa: E402
from gpen.testing import deterministic_state_dict  # noqa: E402
from streamer.faces.align import alignment  # noqa: E402
from tests.support.clips import ASTRONAUT_LANDMARKS, astronaut  # noqa: E402
from workers import wire  # noqa: E402
from workers.restorers import build_restorer, resolve_device, resolve_dtype  # noqa: E402
from workers.temporal import TemporalBlender  # noqa: E402
from workers.temporal_reference import ReferenceBlender  # noqa: E402
from workers.worker import Worker, single_torch_thread  # noqa: E402

BLEND_MAX, BLEND_SIGMA = 0.85, 0.03  # the defaults
TRACKS = 8
FRAMES = 24  # per track; played forwards and back so consecutive frames always move a little


def face_sequence(size: int, frames: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(affine, crop) per frame: a face drifting slowly, its landmarks jittered by ~1.5 px, the
    crops noisy, like a tracked face in a compressed video."""
    rng = np.random.default_rng(seed)
    image = astronaut()
    out = []
    for t in range(frames):
        shift = np.array([0.7 * t, 2.0 * np.sin(t / 5)])
        moved = cv2.warpAffine(image, np.float64([[1, 0, shift[0]], [0, 1, shift[1]]]), image.shape[1::-1],
                               flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101)
        affine = alignment(ASTRONAUT_LANDMARKS + shift + rng.normal(0, 1.5, ASTRONAUT_LANDMARKS.shape), size)
        crop = cv2.warpAffine(moved, affine, (size, size), flags=cv2.INTER_CUBIC)
        crop = np.clip(crop + rng.normal(0, 6, crop.shape), 0, 255).astype(np.uint8)
        out.append((affine, crop))
    return out


def _at(sequence: list, frame: int):
    """Frame ``frame`` of a sequence played forwards and back forever."""
    period = 2 * len(sequence) - 2
    k = frame % period
    return sequence[k if k < len(sequence) else period - k]


# ------------------------------------------------------------------------------ throughput


def standin(model_ms: float, size: int, device: torch.device):
    """A model that sleeps ``model_ms`` per face; on a GPU its outputs are there, in float16."""
    return build_restorer(f"standin-0+{model_ms:g}ms-{size}px", device=device, dtype=resolve_dtype("auto", device))


def gpen(size: int, device: torch.device):
    """GPEN-BFR-<size> with deterministic weights in the official layout, in the run dtype."""
    name = f"GPEN-BFR-{size}"
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{name}-deterministic.pth"
        torch.save(deterministic_state_dict(RELEASED_CONFIGS[name]), path)
        return build_restorer(name, device=device, dtype=resolve_dtype("auto", device), weights=path)


def throughput(restorer, batch: int, temporal: str, sequences: list, seconds: float,
               blender: type = TemporalBlender) -> float:
    """Faces per second through one worker serving ``restorer``."""
    size = sequences[0][0][1].shape[0]
    context = zmq.Context.instance()
    worker = Worker({restorer.name: restorer}, batch=batch, batch_wait_ms=2, context=context,
                    device=str(restorer.device), blender=blender(BLEND_MAX, BLEND_SIGMA))
    endpoint = worker.bind(f"inproc://bench-{uuid.uuid4().hex}")
    thread = threading.Thread(target=worker.serve, daemon=True)
    thread.start()
    dealer = context.socket(zmq.DEALER)
    dealer.connect(endpoint)
    dealer.send_multipart(wire.encode(wire.Hello(job="bench")))
    next_frame = [0] * len(sequences)

    def send(track: int) -> None:
        frame = next_frame[track]
        next_frame[track] += 1
        affine, crop = _at(sequences[track], frame)
        header = wire.Crop(job="bench", frame=frame, track=track, face=0, model=restorer.name, size=size,
                           shape=crop.shape, affine=tuple(map(tuple, affine.tolist())), temporal=temporal)
        dealer.send_multipart(wire.encode(header, crop), copy=False)

    done, warm_until, started, track = 0, time.perf_counter() + min(1.0, seconds / 2), None, 0
    while True:
        header, _ = wire.decode(dealer.recv_multipart())
        if header.kind == "credit":
            for _ in range(header.credits):  # fill the window, round-robin over the tracks
                send(track)
                track = (track + 1) % len(sequences)
            continue
        assert header.kind == "result", header
        now = time.perf_counter()
        if started is None and now >= warm_until:
            started, done = now, 0
        done += 1
        if started is not None and now - started >= seconds:
            break
        send(header.track)  # a result returns its credit: the same track's next frame
    rate = done / (time.perf_counter() - started)
    dealer.send_multipart(wire.encode(wire.Bye(job="bench")))
    dealer.close(linger=0)
    worker.stop_event.set()
    thread.join(30)
    return rate


# ----------------------------------------------------------------------------------- blend


def blend_ms(blender, sequences: list, batches: int, device: torch.device = torch.device("cpu")) -> float:
    """ms per face of blending ``batches`` batches, one frame of every track in each, in a
    thread like the worker's blend thread."""
    threads = torch.get_num_threads()
    with ThreadPoolExecutor(max_workers=1, initializer=single_torch_thread) as blend_thread:
        blend_thread.submit(lambda: None).result()  # its initializer has run...
        torch.set_num_threads(threads)  # ...and changed the default for every other thread: put it back
        return blend_thread.submit(_blend_ms, blender, sequences, batches, device).result()


def _blend_ms(blender, sequences: list, batches: int, device: torch.device) -> float:
    run_dtype = resolve_dtype("auto", device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    total = 0.0
    for step in range(2 + batches):  # two to warm up
        picked = [_at(seq, step) for seq in sequences]
        inputs = torch.from_numpy(np.stack([crop for _, crop in picked])).to(device)
        # the identity restorer's outputs (blending costs the same), as a restorer leaves them: on a
        # CPU uint8, on a GPU in the run dtype
        restored = inputs.clone() if device.type == "cpu" else inputs.to(run_dtype)
        keys = [("peer", "bench", t) for t in range(len(sequences))]
        sync()
        started = time.perf_counter()
        blender.blend_batch(keys, [step] * len(keys), [a for a, _ in picked], inputs, restored, [False] * len(keys),
                            run_dtype=run_dtype)
        sync()
        if step >= 2:
            total += time.perf_counter() - started
    return total / (batches * len(sequences)) * 1000


def cpu_jiffies() -> tuple[int, int] | None:
    """(stolen, all) CPU time since boot from /proc/stat, in clock ticks: on a virtual machine
    the host may run other guests on our cores ("steal"), which slows every figure here by as
    much; None where there is no /proc/stat."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    except OSError:
        return None
    ticks = [int(f) for f in fields[:8]]
    return ticks[7], sum(ticks)


def steal_note(since: tuple[int, int] | None) -> str:
    now = cpu_jiffies()
    if since is None or now is None or now[1] <= since[1]:
        return ""
    return f"  (the host took {100 * (now[0] - since[0]) / (now[1] - since[1]):.0f}% of this machine's CPU time meanwhile)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--latencies", type=float, nargs="*", default=[1.0, 5.0],
                    help="stand-in model, ms per face (none: the blend only)")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--seconds", type=float, default=4.0, help="measured per configuration, after a warm-up")
    ap.add_argument("--blend-batches", type=int, default=10,
                    help="batches of 16 per blend measurement (4x as many batches of one face)")
    ap.add_argument("--blend-rounds", type=int, default=3, help="blend measurements of each blender, taken in turn")
    ap.add_argument("--threads", type=int, default=0, help="torch and OpenCV threads (default: theirs)")
    ap.add_argument("--device", default="auto", help="auto (cuda where present), cpu, cuda, cuda:N")
    ap.add_argument("--gpen", action="store_true", help="also the throughput with GPEN-BFR-512 as the model")
    ap.add_argument("--profile", action="store_true",
                    help="then torch's profile of the tensor blender at batch 1 (512 px): where a call's time goes")
    args = ap.parse_args()
    device = resolve_device(args.device)
    on_cpu = device.type == "cpu"
    if args.threads:
        torch.set_num_threads(args.threads)
        cv2.setNumThreads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, OpenCV {cv2.__version__}, "
          f"{cv2.getNumThreads()} threads; " + ("CPU" if on_cpu else torch.cuda.get_device_name(device)))

    models = [(f"{latency:g} ms", standin(latency, 512, device)) for latency in args.latencies]
    if args.gpen:
        models.append(("GPEN-512", gpen(512, device)))
    sequences = [face_sequence(512, FRAMES, seed) for seed in range(TRACKS)] if models else []
    if models:
        gpen_dtype = f", or GPEN-BFR-512 in {str(models[-1][1].dtype).removeprefix('torch.')}" if args.gpen else ""
        print(f"\nworker throughput, faces/s ({TRACKS} tracks of 512 px faces, inproc://; model: a stand-in "
              f"taking that long per face{gpen_dtype})")
        print(f"{'model':>14}{'batch':>7}{'off':>9}{'full':>9}{'full/off':>10}" + (f"{'full, ref':>11}" if on_cpu else ""))
    started = cpu_jiffies()
    for label, restorer in models:
        for batch in args.batches:
            off = throughput(restorer, batch, "off", sequences, args.seconds)
            full = throughput(restorer, batch, "full", sequences, args.seconds)
            ref = f"{throughput(restorer, batch, 'full', sequences, args.seconds, ReferenceBlender):>11.1f}" if on_cpu else ""
            print(f"{label:>14}{batch:>7}{off:>9.1f}{full:>9.1f}{full / off:>10.2f}{ref}", flush=True)
    if models and (note := steal_note(started)):
        print(note)

    print(f"\nblend, ms per face (batch 16, and one 512 px face per batch as at batch 1; median of "
          f"{args.blend_rounds} rounds, taken in turn; the tensor blender on {device}, the reference on the CPU)")
    eager = not on_cpu  # on a GPU also the tensor blender without CUDA graphs
    print(f"{'crop':>6}{'batch':>7}{'tensor':>9}{'reference':>11}{'ratio':>8}" + (f"{'eager':>9}" if eager else ""))
    started = cpu_jiffies()
    for size, batch in ((256, 16), (512, 16), (512, 1)):
        sequences = [face_sequence(size, FRAMES, seed) for seed in range(batch)]
        batches = args.blend_batches if batch == 16 else args.blend_batches * 4  # at batch 1, 40 faces by default
        rounds = [(blend_ms(TemporalBlender(BLEND_MAX, BLEND_SIGMA), sequences, batches, device),
                   blend_ms(ReferenceBlender(BLEND_MAX, BLEND_SIGMA), sequences, batches),  # the reference: CPU only
                   blend_ms(TemporalBlender(BLEND_MAX, BLEND_SIGMA, cuda_graphs=False), sequences, batches, device)
                   if eager else 0.0)
                  for _ in range(args.blend_rounds)]
        tensor, reference, eager_ms = (statistics.median(times) for times in zip(*rounds))
        print(f"{size:>6}{batch:>7}{tensor:>9.2f}{reference:>11.2f}{reference / tensor:>8.2f}"
              + (f"{eager_ms:>9.2f}" if eager else ""), flush=True)
    if note := steal_note(started):
        print(note)

    if args.profile:
        sequences = [face_sequence(512, FRAMES, 0)]
        blender = TemporalBlender(BLEND_MAX, BLEND_SIGMA)
        blend_ms(blender, sequences, 4, device)  # warm
        activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if not on_cpu else [])
        with torch.profiler.profile(activities=activities) as prof:
            calls = 20
            took = _blend_ms(blender, sequences, calls, device)  # in this thread: the profiler follows it
        events = prof.key_averages()
        print(f"\nprofile of {calls} blends of one 512 px face ({took:.2f} ms each): "
              f"{sum(e.count for e in events if e.key.startswith('aten::')) / calls:.0f} aten ops per call")
        print(events.table(sort_by="cpu_time_total", row_limit=25))


if __name__ == "__main__":
    main()
