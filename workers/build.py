"""The one way to build a worker: from its settings, the models it serves and its device.
Used by ``gpen-stream worker`` and by the workers a decoder starts for itself."""

from __future__ import annotations

import time
from collections.abc import Iterable

import torch
import zmq

from configs import WorkerSettings
from workers import cpu_kernels, metrics
from workers.budget import MIB, calibrate_blend, fit_batch, reserve_for_loading
from workers.residency import Residency, ResidentRestorer
from workers.restorers import (IDENTITY, ModelUnavailable, build_restorer, crop_size, needs_weights, resolve_device,
                               resolve_dtype)
from workers.temporal import TemporalBlender, blend_dtype
from workers.worker import Worker


def build_worker(models: Iterable[str], settings: WorkerSettings, *, device: str | None = None,
                 context: zmq.Context | None = None, allow_download: bool = True, worker_id: str | None = None,
                 budget=None) -> Worker:
    """A worker serving ``models`` on ``device`` (default: the settings' device). Checkpoints
    come from ``settings.models`` (name -> file) or the weight cache. The first model is loaded
    now, and the batch chosen for it; with a ``budget`` (a ``workers.budget.GpuBudget``) inside
    the memory lease it grants (``workers.budget.fit_batch``; the temporal blend's memory is
    leased too: ``calibrate_blend``), the other models load when a
    crop needs them (``workers.residency``), without one they load now too. Every checkpoint is
    located (downloaded if allowed) now: a missing one fails here. Raises ModelUnavailable."""
    dev = resolve_device(device or settings.device)
    dtype = resolve_dtype(settings.dtype, dev)
    if settings.threads:
        torch.set_num_threads(settings.threads)  # process-wide
    models = list(dict.fromkeys(models))
    for name in models:
        _locate(name, settings, allow_download)

    def loader(name: str):
        return lambda: build_restorer(name, device=dev, dtype=dtype, weights=settings.models.get(name),
                                      allow_download=allow_download)

    first = models[0]
    if budget is not None:
        reserve_for_loading(budget, first, settings, dtype)
    restorer = loader(first)()
    metrics.MODEL_LOADS.labels(kind="restorer").inc()
    if dev.type == "cpu":  # the CPU blend's kernels: compiled now, not in the first batch (or its calibration)
        cpu_kernels.warm_up()
    run_dtypes = {name: dtype if needs_weights(name) else torch.float32 for name in models}
    blender = TemporalBlender(settings.blend_max, settings.blend_sigma, settings.temporal_state_mib * MIB,
                              cuda_graphs=settings.cuda_graphs)
    measured: dict = {}
    blend = None
    # the blend's memory is leased too, measured for the model whose states are largest (identity
    # restores, so blends, on the host whatever the device)
    blended_here = [(crop_size(name, settings.models.get(name)), run_dtypes[name]) for name in models
                    if dev.type == "cpu" or name != IDENTITY]
    if budget is not None and blended_here:
        size, run_dtype = max(blended_here, key=lambda s: s[0] ** 2 * blend_dtype(dev, s[1]).itemsize)
        blend = calibrate_blend(blender, dev, run_dtype, size=size, batch=settings.batch)
    batch = settings.batch if budget is None else fit_batch(budget, {first: restorer}, dev, settings.batch,
                                                            measured=measured, blend=blend)
    residency = Residency({name: loader(name) for name in models}, device=dev, dtype=dtype, batch=batch,
                          budget=budget, weights=settings.models, idle_unload_s=settings.idle_unload_s, blend=blend)
    residency.loaded[first] = restorer
    residency.memory.update(measured)
    residency.last_used[first] = time.monotonic()
    if budget is None:
        for name in models[1:]:
            residency.get(name)
    restorers = {name: ResidentRestorer(residency, name, crop_size(name, settings.models.get(name)),
                                        run_dtypes[name]) for name in models}
    worker = Worker(restorers, batch=batch, batch_wait_ms=settings.batch_wait_ms, credits=settings.credits,
                    device=str(dev), context=context, worker_id=worker_id, residency=residency, blender=blender)
    if budget is not None:  # a lapsed lease another worker took: unload, and load again only inside a new one
        budget.on_lost = lambda _mib: worker.lease_lost.set()
    return worker


def _locate(name: str, settings: WorkerSettings, allow_download: bool) -> None:
    crop_size(name, settings.models.get(name))  # an unknown name fails here
    if needs_weights(name):
        from gpen.weights import WeightsError, locate

        try:
            locate(name, settings.models.get(name), allow_download=allow_download)
        except WeightsError as exc:
            raise ModelUnavailable(str(exc)) from None
