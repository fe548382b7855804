"""Several models in one worker: loaded when a crop needs them, inside the memory lease (real
Redis), least recently used unloaded to make room, idle ones unloaded, and a worker built for
two models serving crops of both."""

import time

import numpy as np
import torch

from tests.support.redis_server import unique_prefix
from workers.budget import GpuBudget, leases
from workers.residency import Residency
from workers.restorers import build_restorer

CPU = torch.device("cpu")


def _residency(weights, names, **kwargs):
    loaders = {n: (lambda: build_restorer(n, device=CPU, dtype=torch.float32, weights=weights)) for n in names}
    return Residency(loaders, device=CPU, dtype=torch.float32, batch=1, weights={n: weights for n in names}, **kwargs)


def test_a_lease_that_holds_one_model_unloads_the_least_recently_used_to_load_another(redis_server, gpen256_weights):
    r = redis_server.client()
    key = f"{unique_prefix()}:gpu:test:0"
    budget = GpuBudget(r, key, "w1", total_mib=100_000)
    a, b = "GPEN-BFR-256", "GPEN-BFR-256-copy"  # two names for one checkpoint: two models to the worker
    residency = _residency(gpen256_weights, [a, b], budget=budget)
    crops = np.random.default_rng(0).integers(0, 256, (1, 256, 256, 3), dtype=np.uint8)
    try:
        first = residency.get(a).run(crops)
        one_model = budget.mib
        r.hset(key, "total_mib", int(one_model * 1.5))  # room for one model, not two
        budget.total_mib = int(one_model * 1.5)

        residency.get(b).run(crops)
        assert list(residency.loaded) == [b]  # a went to make room
        assert sum(leases(r, key).values()) <= int(one_model * 1.5)

        again = residency.get(a).run(crops)
        assert list(residency.loaded) == [a]
        assert sum(leases(r, key).values()) <= int(one_model * 1.5)
        np.testing.assert_array_equal(first, again)  # reloaded from the same checkpoint: the same model
    finally:
        budget.release()


def test_with_room_for_both_both_stay_loaded_and_the_lease_grows(redis_server, gpen256_weights):
    r = redis_server.client()
    key = f"{unique_prefix()}:gpu:test:0"
    budget = GpuBudget(r, key, "w1", total_mib=100_000)
    residency = _residency(gpen256_weights, ["GPEN-BFR-256", "GPEN-BFR-256-copy"], budget=budget)
    try:
        residency.get("GPEN-BFR-256")
        one = budget.mib
        residency.get("GPEN-BFR-256-copy")
        assert list(residency.loaded) == ["GPEN-BFR-256", "GPEN-BFR-256-copy"]
        assert budget.mib > one and leases(r, key) == {"w1": budget.mib}
        residency.unload("GPEN-BFR-256", why="test")
        assert budget.mib < 2 * one and leases(r, key) == {"w1": budget.mib}  # the lease shrinks with it
    finally:
        budget.release()


def test_models_unused_for_idle_unload_s_are_unloaded_but_the_last_used_one_stays():
    residency = Residency({n: (lambda n=n: build_restorer(n, device=CPU, dtype=torch.float32))
                           for n in ("identity", "standin-1+0ms-64px")},
                          device=CPU, dtype=torch.float32, batch=1, idle_unload_s=0.05)
    residency.get("identity")
    residency.get("standin-1+0ms-64px")
    assert residency.unload_idle() == []  # not idle yet
    time.sleep(0.1)
    assert residency.unload_idle() == ["identity"]
    assert list(residency.loaded) == ["standin-1+0ms-64px"]
    residency.get("identity")  # needed again: loaded again
    assert "identity" in residency.loaded


def test_a_worker_for_two_models_serves_crops_of_both(worker_settings):
    import threading

    import zmq

    from streamer.dispatch import CropTask, Dispatcher, FrameTask, WorkerLink
    from workers.build import build_worker

    worker = build_worker(["identity", "standin-1+0ms-64px"], worker_settings(batch_wait_ms=5))
    endpoint = worker.bind(f"inproc://residency-{unique_prefix()}")
    thread = threading.Thread(target=worker.serve, daemon=True)
    thread.start()
    try:
        assert worker.status()["loaded"] == ["identity", "standin-1+0ms-64px"]
        for model, size in (("standin-1+0ms-64px", 64), ("identity", worker.restorers["identity"].size)):
            d = Dispatcher([WorkerLink(zmq.Context.instance(), endpoint)], job="j-" + model, model=model, size=size,
                           temporal="off", timeout_s=30)
            try:
                d.wait_ready(30)
                crop = np.full((size, size, 3), 7, np.uint8)
                d.submit(FrameTask(0, None, crops=[CropTask(0, 0, 0, np.eye(2, 3), crop)]))
                done, deadline = [], time.monotonic() + 30
                while not done:
                    done += d.pump(20)
                    assert time.monotonic() < deadline
                np.testing.assert_array_equal(done[0].restored[0], crop)  # both restorers return their input
            finally:
                d.close()
    finally:
        worker.stop_event.set()
        thread.join(30)
