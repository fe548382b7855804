"""Which of a worker's models are in memory (FaceFusion's "moderate" video-memory strategy,
across processes through the memory lease).

A worker serves a list of models; each is loaded when a crop needs it, inside the worker's
memory lease (``workers.budget``), and the least recently used ones are unloaded when the lease
cannot grow to hold it, or when one has not been used for ``idle_unload_s`` (except the most
recently used one: a worker keeps one model warm for the next job). After an unload the
CUDA caching allocator hands its blocks back (``torch.cuda.empty_cache``), so another process on
the device can use them, and the lease shrinks to what is still loaded.

Loads, unloads and model runs all happen in the worker's model thread, one at a time, so a
model is never unloaded under a running batch. Without a lease (no Redis) every model stays
loaded once used, unless idle.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from collections import OrderedDict
from typing import Callable

import numpy as np
import torch
from redis.exceptions import RedisError

from workers import metrics
from workers.budget import MIB, WAIT_FOR_MEMORY_S, MemoryModel, calibrate, checkpoint_bytes

log = logging.getLogger(__name__)


class Residency:
    def __init__(self, loaders: dict[str, Callable[[], object]], *, device: torch.device, dtype: torch.dtype,
                 batch: int, budget=None, weights: dict | None = None, idle_unload_s: float | None = None,
                 blend: MemoryModel | None = None):
        self.loaders = loaders  # name -> a function that loads it (a Restorer)
        self.device, self.dtype, self.batch = device, dtype, batch
        self.budget, self.weights = budget, weights or {}
        self.idle_unload_s = idle_unload_s
        self.loaded: OrderedDict[str, object] = OrderedDict()  # least recently used first
        self.memory: dict[str, MemoryModel] = {}
        self.blend = blend  # the temporal blend's memory (workers.budget.calibrate_blend), leased beside the models'
        self.last_used: dict[str, float] = {}
        self.stop = threading.Event()  # set when the worker gives up draining: waiting for memory ends

    def get(self, name: str):
        """The loaded model ``name``, loading it (and unloading others to make room) if needed."""
        restorer = self.loaded.get(name)
        if restorer is None:
            restorer = self._load(name)
        self.loaded.move_to_end(name)
        self.last_used[name] = time.monotonic()
        return restorer

    def held_bytes(self, batch: int | None = None) -> int:
        """What the lease must hold: the loaded models at the batch, and the temporal blend: its
        states and graphs always (they stay when models unload), its batch's working memory
        while a model is loaded (without one no crop is blended)."""
        b = batch or self.batch
        blend = 0 if self.blend is None else self.blend.weights + (self._blend_batch(b) if self.loaded else 0)
        return blend + sum(self.memory[n].needed(b) for n in self.loaded if n in self.memory)

    def _blend_batch(self, batch: int) -> int:
        return self.blend.needed(batch) - self.blend.weights

    def _load(self, name: str):
        if self.budget is not None:
            self._make_room(name)
        started = time.perf_counter()
        try:
            restorer = self.loaders[name]()
            self.loaded[name] = restorer
            metrics.MODEL_LOADS.labels(kind="restorer").inc()
            if self.budget is not None:
                self.memory[name] = calibrate(restorer, self.device, weights=restorer.weights_bytes(),
                                              batch=self.batch)
        except BaseException:  # the lease grew for it: give that back
            self.loaded.pop(name, None)
            if self.budget is not None:
                self._shrink()
            raise
        if self.budget is not None:
            self._hold(self.held_bytes())
        log.info("loaded %s in %.1f s (%s)", name, time.perf_counter() - started,
                 ", ".join(self.loaded) + " in memory")
        return restorer

    def _blend_to_come(self) -> int:
        """With no model loaded, the blend's working memory, which the next one loaded brings back."""
        return self._blend_batch(self.batch) if self.blend is not None and not self.loaded else 0

    def _make_room(self, name: str) -> None:
        """Grow the lease by what loading ``name`` needs (its weights twice: weights and the
        calibration batches), unloading the least recently used models until it can."""
        known = self.memory.get(name)
        extra = known.needed(self.batch) if known else 2 * checkpoint_bytes(name, self.weights.get(name), self.dtype)
        said = 0.0
        while True:
            try:
                if self.budget.acquire(-(-(self.held_bytes() + extra + self._blend_to_come()) // MIB)):
                    return
                why = "other workers hold the rest"
            except RedisError as exc:  # Redis away for a moment: wait for it, unload nothing
                why = f"Redis: {exc}"
            else:
                if self.loaded:
                    self.unload(next(iter(self.loaded)), why="to make room for " + name)
                    continue
            # its crops wait here (the worker still answers its decoders) until memory comes free
            if time.monotonic() - said > 30:
                log.warning("waiting for %.0f MiB on %s to load %s (%s)", extra / MIB, self.budget.key, name, why)
                said = time.monotonic()
            if self.stop.wait(WAIT_FOR_MEMORY_S):
                raise InterruptedError(f"the worker is stopping: no memory came free to load {name}")

    def _hold(self, nbytes: int) -> None:
        mib = max(1, -(-nbytes // MIB))
        if not self.budget.acquire(mib):  # measured more than estimated: unload others until it fits
            while len(self.loaded) > 1 and not self.budget.acquire(mib):
                self.unload(next(iter(self.loaded)), why="the last model loaded needs more than estimated")
                mib = max(1, -(-self.held_bytes() // MIB))
            if len(self.loaded) == 1 and self.budget.mib < mib:
                log.warning("%s needs %d MiB measured, more than the %d MiB the lease on %s could grow to: "
                            "it runs outside the budget until other workers let go", next(iter(self.loaded)), mib,
                            self.budget.mib, self.budget.key)

    def unload(self, name: str, *, why: str) -> None:
        restorer = self.loaded.pop(name, None)
        if restorer is None:
            return
        del restorer
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()  # hand the blocks back to the device, not just to torch's cache
        if self.budget is not None:
            self._shrink()
        log.info("unloaded %s (%s)", name, why)

    def unload_all(self, *, why: str) -> None:
        """Every model out (the lease was lost): the next crop loads its model again, inside a
        lease granted anew (``_make_room`` waits for it)."""
        for name in list(self.loaded):
            self.unload(name, why=why)

    def _shrink(self) -> None:
        """The lease down to what is loaded (shrinking always succeeds while Redis answers)."""
        try:
            self.budget.acquire(max(1, -(-self.held_bytes() // MIB)))
        except RedisError as exc:  # the lease lapses at its TTL anyway, or the renewer shrinks it
            log.warning("could not shrink the memory lease on %s: %s", self.budget.key, exc)

    def unload_idle(self) -> list[str]:
        """Unload models unused for ``idle_unload_s``; returns their names."""
        if not self.idle_unload_s:
            return []
        now = time.monotonic()
        # the most recently used model stays: a worker keeps one model warm for the next job
        idle = [n for n in list(self.loaded)[:-1] if now - self.last_used.get(n, now) >= self.idle_unload_s]
        for name in idle:
            self.unload(name, why=f"unused for {self.idle_unload_s:g} s")
        return idle


class ResidentRestorer:
    """Stands for one model of a ``Residency`` in the worker: what the worker needs to know
    without loading it (name, crop size, dtype), and ``run`` that loads it if need be. Called
    from the model thread only."""

    def __init__(self, residency: Residency, name: str, size: int, dtype: torch.dtype):
        self.residency, self.name, self.size, self.dtype = residency, name, size, dtype

    @property
    def loaded(self) -> bool:
        return self.name in self.residency.loaded

    def load(self):
        """Load the model now if it is not loaded (the worker does so before timing a run)."""
        return self.residency.get(self.name)

    @property
    def device(self) -> torch.device:
        """Where its outputs are left: the loaded model's device (a diagnostic restorer's is the
        host's), else the worker's."""
        restorer = self.residency.loaded.get(self.name)
        return restorer.device if restorer is not None else self.residency.device

    def run(self, crops: np.ndarray | torch.Tensor, *, on_device: bool = False):
        return self.residency.get(self.name).run(crops, on_device=on_device)

    def weights_bytes(self) -> int:
        restorer = self.residency.loaded.get(self.name)
        return restorer.weights_bytes() if restorer is not None else 0
