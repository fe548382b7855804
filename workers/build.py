"""The one way to build a worker: from its settings, the models it serves and its device.
Used by ``gpen-stream worker`` and by the workers a decoder starts for itself."""

from __future__ import annotations

from collections.abc import Iterable

import torch
import zmq

from configs import WorkerSettings
from workers import metrics
from workers.budget import fit_batch, reserve_for_loading
from workers.restorers import build_restorer, resolve_device, resolve_dtype
from workers.temporal import TemporalBlender
from workers.worker import Worker


def build_worker(models: Iterable[str], settings: WorkerSettings, *, device: str | None = None,
                 context: zmq.Context | None = None, allow_download: bool = True, worker_id: str | None = None,
                 budget=None) -> Worker:
    """A worker serving ``models`` on ``device`` (default: the settings' device). Checkpoints
    come from ``settings.models`` (name -> file) or the weight cache. With a ``budget`` (a
    ``workers.budget.GpuBudget``) the models are loaded, and the batch chosen, only inside the
    memory lease it grants (``workers.budget.fit_batch``). Raises ModelUnavailable."""
    dev = resolve_device(device or settings.device)
    dtype = resolve_dtype(settings.dtype, dev)
    if settings.threads:
        torch.set_num_threads(settings.threads)  # process-wide
    restorers = {}
    for name in models:
        if budget is not None:
            reserve_for_loading(budget, name, settings, dtype)
        restorers[name] = build_restorer(name, device=dev, dtype=dtype, weights=settings.models.get(name),
                                         allow_download=allow_download)
    metrics.MODEL_LOADS.labels(kind="restorer").inc(len(restorers))
    batch = settings.batch if budget is None else fit_batch(budget, restorers, dev, settings.batch)
    return Worker(restorers, batch=batch, batch_wait_ms=settings.batch_wait_ms, credits=settings.credits,
                  device=str(dev), context=context, worker_id=worker_id,
                  blender=TemporalBlender(settings.blend_max, settings.blend_sigma))
