"""Several models in one worker: loaded when a crop needs them, inside the memory lease (real
Redis), least recently used unloaded to make room, idle ones unloaded, and a worker built for
two models serving crops of both."""

import time

import numpy as np
import torch

from tests.support.redis_server import unique_prefix
from workers.budget import MIB, GpuBudget, MemoryModel, leases
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


def _slow_loader(name, seconds):
    def load():
        time.sleep(seconds)
        return build_restorer(name, device=CPU, dtype=torch.float32)
    return load


def test_loading_a_model_on_demand_does_not_count_as_its_run_time():
    """Deadlines are judged by how long the model runs: a 1 s load counted as a run would make
    every live crop look late, and they would all be shed."""
    from workers.residency import ResidentRestorer
    from workers.temporal import TemporalBlender
    from workers.worker import Worker

    name = "standin-1+0ms-64px"
    residency = Residency({name: _slow_loader(name, 1.0)}, device=CPU, dtype=torch.float32, batch=1)
    worker = Worker({name: ResidentRestorer(residency, name, 64, torch.float32)}, batch=1, batch_wait_ms=1,
                    blender=TemporalBlender(0.85, 0.03), residency=residency)
    try:
        started = time.perf_counter()
        worker._run_model(worker.restorers[name], [np.zeros((64, 64, 3), np.uint8)])
        assert time.perf_counter() - started >= 1.0  # it did load, in the model thread's call
        assert worker._model_s[name] < 0.2  # but only the run (~1 ms) counts
    finally:
        worker.stop_event.set()
        worker.serve()  # stopped: it drains (nothing) and closes its threads and socket


def test_a_load_waiting_for_memory_ends_when_the_worker_stops(redis_server, gpen256_weights):
    import threading

    r = redis_server.client()
    key = f"{unique_prefix()}:gpu:test:0"
    other = GpuBudget(r, key, "other", total_mib=100)
    other.acquire(100)  # another worker holds the whole device
    budget = GpuBudget(r, key, "w1", total_mib=100)
    name = "GPEN-BFR-256"
    residency = _residency(gpen256_weights, [name], budget=budget)
    outcome = []
    thread = threading.Thread(target=lambda: outcome.append(_raised(lambda: residency.get(name))), daemon=True)
    try:
        thread.start()
        time.sleep(0.5)
        assert thread.is_alive()  # waiting for memory
        residency.stop.set()
        thread.join(5)
        assert not thread.is_alive() and isinstance(outcome[0], InterruptedError)
        assert not residency.loaded
    finally:
        budget.release()
        other.release()


def test_a_failed_load_gives_back_the_memory_it_leased(redis_server):
    r = redis_server.client()
    key = f"{unique_prefix()}:gpu:test:0"
    budget = GpuBudget(r, key, "w1", total_mib=100_000)
    name = "standin-1+0ms-64px"

    def broken():
        raise RuntimeError("the checkpoint is damaged")

    residency = Residency({name: broken}, device=CPU, dtype=torch.float32, batch=1, budget=budget,
                          weights={name: None})
    try:
        assert isinstance(_raised(lambda: residency.get(name)), RuntimeError)
        assert budget.mib <= 1 and leases(r, key).get("w1", 0) <= 1  # nothing loaded: nothing held
    finally:
        budget.release()


def _raised(call):
    try:
        call()
    except BaseException as exc:  # noqa: BLE001 - the test looks at what it was
        return exc
    return None


def test_a_workers_lease_holds_its_temporal_state_and_blend_workspace(redis_server, worker_settings):
    """The blend's memory is leased beside the model's: the state cap (temporal_state_mib) in
    full, and what blending a batch takes, measured (here the outputs alone are 3 MiB a crop)."""
    from workers.build import build_worker

    r = redis_server.client()
    prefix = unique_prefix()
    held = {}
    for state_mib in (16, 80):
        budget = GpuBudget(r, f"{prefix}:gpu:test:{state_mib}", "w1", total_mib=100_000)
        try:
            worker = build_worker(["standin-0+0ms-512px"], worker_settings(batch=4, temporal_state_mib=state_mib),
                                  budget=budget)
            held[state_mib] = budget.mib
            assert worker.blender.max_bytes == state_mib * MIB
            assert len(worker.blender) == 0  # the calibration's tracks are gone
        finally:
            budget.release()
    assert held[16] >= 16 + 4 * 3
    assert abs(held[80] - held[16] - 64) <= 8  # the state cap counted once, whole


def test_the_blends_states_stay_leased_and_its_batch_memory_comes_and_goes_with_the_models():
    """States and graphs outlive an unload (they are still in memory); a batch's blend memory is
    needed only while a model is loaded, and the next load brings it back."""
    blend = MemoryModel(weights=10 * MIB, per_crop=2 * MIB, workspace=MIB)
    residency = Residency({"identity": lambda: build_restorer("identity", device=CPU, dtype=torch.float32)},
                          device=CPU, dtype=torch.float32, batch=4, blend=blend)
    residency.memory["identity"] = MemoryModel(weights=5 * MIB, per_crop=MIB, workspace=0)
    assert residency.held_bytes() == 10 * MIB and residency._blend_to_come() == 9 * MIB
    residency.get("identity")
    assert residency.held_bytes() == 19 * MIB + 9 * MIB and residency._blend_to_come() == 0
    residency.unload("identity", why="test")
    assert residency.held_bytes() == 10 * MIB


def test_a_worker_whose_lapsed_lease_another_took_unloads_its_models_until_it_has_one_again(redis_server,
                                                                                         worker_settings):
    """Its Redis was out of reach past the lease's TTL and another worker took the memory: it
    must not keep running outside any lease."""
    import threading

    from workers.build import build_worker

    r = redis_server.client()
    key = f"{unique_prefix()}:gpu:test:0"
    budget = GpuBudget(r, key, "w1", total_mib=100_000, ttl_s=1.0)
    other = GpuBudget(r, key, "w2", total_mib=100_000, ttl_s=1.0)
    worker = build_worker(["standin-0+0ms-256px"], worker_settings(batch=2), budget=budget)
    worker.bind("inproc://lease-lost")
    thread = threading.Thread(target=worker.serve, daemon=True)
    thread.start()
    try:
        assert list(worker.residency.loaded) == ["standin-0+0ms-256px"]
        budget._stop.set()  # its renewals stop for longer than the TTL
        time.sleep(1.5)
        assert other.acquire(100_000 - 10)
        assert not budget.renew()  # what its renewing thread does once Redis answers again
        deadline = time.monotonic() + 10
        while worker.residency.loaded and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not worker.residency.loaded
        assert sum(leases(r, key).values()) <= 100_000  # what the two hold fits the device
    finally:
        worker.stop_event.set()
        thread.join(10)
        other.release()
        budget.release()
