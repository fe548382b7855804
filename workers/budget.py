"""Memory budgets: how much a model needs, and per-GPU leases in Redis so that several worker
processes on one GPU never hold more than the GPU has, whatever order they start in.

The memory model (DESIGN.md section 7): a model at batch b needs

    weights (at the run dtype)  +  per_crop x b  +  workspace

``weights`` is counted from the parameters; ``per_crop`` and ``workspace`` are *measured*
(``calibrate``): the peak memory of a batch of 1 and of a batch of 2, on CUDA from
``torch.cuda.max_memory_allocated``, on the CPU from the growth of the process's peak resident
memory (VmHWM, reset between runs through /proc/self/clear_refs). The temporal blend is
counted the same way beside the models (``calibrate_blend``): its tracks' state cap and, on a
GPU, its CUDA graphs' pool as its "weights", its batch's working memory measured.

A lease is one field of the GPU's hash ``<prefix>:gpu:<host>:<index>``:

    total_mib           the budget that applies now: the smallest total a live holder reported
    lease:<holder>      "<mib>:<expires, ms since the epoch>"
    total:<holder>      the total that holder reported (torch.cuda.mem_get_info's, or
                        worker.memory_budget_mib), gone with its lease

taken, renewed and released by Lua scripts (atomic: check what is free and reserve, or refuse).
Holders renew on every heartbeat; a lease whose holder died expires and is reclaimed by the
next acquire.
"""

from __future__ import annotations

import ctypes
import gc
import logging
import os
import threading
import time
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)

MIB = 1 << 20
LEASE_TTL_S = 10.0

# KEYS[1] the GPU hash. ARGV: holder, MiB wanted, ttl ms, the holder's total MiB.
# Returns {1, free after} when reserved, {0, free now} when refused. Expired leases are removed.
# The budget is the smallest total reported by the live holders and this one: a changed
# worker.memory_budget_mib (or other hardware under a host name) counts from the next acquire,
# and workers that disagree about one device never over-commit it.
ACQUIRE_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local total = tonumber(ARGV[4])
local mine = 'lease:' .. ARGV[1]
local used = 0
local fields = redis.call('HGETALL', KEYS[1])
for i = 1, #fields, 2 do
  local name, value = fields[i], fields[i + 1]
  if string.sub(name, 1, 6) == 'lease:' then
    local holder = string.sub(name, 7)
    local sep = string.find(value, ':')
    local mib, expires = tonumber(string.sub(value, 1, sep - 1)), tonumber(string.sub(value, sep + 1))
    if expires < now then
      redis.call('HDEL', KEYS[1], name, 'total:' .. holder)
    elseif name ~= mine then
      used = used + mib
      local theirs = tonumber(redis.call('HGET', KEYS[1], 'total:' .. holder))
      if theirs and theirs < total then total = theirs end
    end
  end
end
redis.call('HSET', KEYS[1], 'total_mib', total)
local want = tonumber(ARGV[2])
if used + want > total then
  return {0, total - used}
end
redis.call('HSET', KEYS[1], mine, ARGV[2] .. ':' .. (now + tonumber(ARGV[3])), 'total:' .. ARGV[1], ARGV[4])
return {1, total - used - want}
"""

# KEYS[1] the GPU hash. ARGV: holder, ttl ms. 1: renewed; 0: the lease was gone (expired, reclaimed).
RENEW_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local value = redis.call('HGET', KEYS[1], 'lease:' .. ARGV[1])
if not value then return 0 end
local sep = string.find(value, ':')
if tonumber(string.sub(value, sep + 1)) < now then
  redis.call('HDEL', KEYS[1], 'lease:' .. ARGV[1], 'total:' .. ARGV[1])
  return 0
end
redis.call('HSET', KEYS[1], 'lease:' .. ARGV[1], string.sub(value, 1, sep - 1) .. ':' .. (now + tonumber(ARGV[2])))
return 1
"""


@dataclass(frozen=True)
class MemoryModel:
    """Bytes a model needs at a batch size: weights + per_crop * batch + workspace."""

    weights: int
    per_crop: int
    workspace: int

    def needed(self, batch: int) -> int:
        return self.weights + self.per_crop * batch + self.workspace

    def largest_batch(self, budget: int, cap: int) -> int:
        """The largest batch (<= cap) that fits in ``budget`` bytes; 0 if not even one."""
        room = budget - self.weights - self.workspace
        if room < self.per_crop:
            return 0
        return min(cap, room // max(self.per_crop, 1))


def weights_bytes(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


# ---------------------------------------------------------------------- measuring


def _rss_peak() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise OSError("no VmHWM in /proc/self/status")


def _rss_now() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise OSError("no VmRSS in /proc/self/status")


def _reset_rss_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS


def _give_back_freed_memory() -> None:
    """glibc keeps freed blocks for reuse; hand them back so the resident size before a run is
    what is really in use (else a run that reuses them seems to need nothing)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the figures may read low
        pass


def peak_during(run, device: torch.device) -> int:
    """Bytes a call of ``run()`` needed above what was in use before it (its peak)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        run()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    _give_back_freed_memory()
    _reset_rss_peak()
    before = _rss_now()
    run()
    return _rss_peak() - before


def calibrate(restorer, device: torch.device, *, weights: int, batch: int = 4) -> MemoryModel:
    """Measure ``per_crop`` and ``workspace`` of a freshly loaded ``restorer`` with three runs:
    the first (batch 1) also builds what the model keeps after its first call (cached derived
    weights), then a batch of ``batch`` (the batch it will run: activation memory is not quite
    linear in the batch) and a batch of 1 again.
    per_crop = (peak(batch) - peak(1)) / (batch - 1); workspace = what the first run needed
    beyond one crop (those caches, and scratch space)."""
    import numpy as np

    batch = max(2, batch)
    crops = np.zeros((batch, restorer.size, restorer.size, 3), np.uint8)
    first = peak_during(lambda: restorer.restore(crops[:1]), device)
    many = peak_during(lambda: restorer.restore(crops), device)
    one = peak_during(lambda: restorer.restore(crops[:1]), device)
    per_crop = max((many - one) // (batch - 1), 1)
    workspace = max(first - per_crop, 0)
    model = MemoryModel(weights, per_crop, workspace)
    log.info("%s at %d px on %s: weights %.0f MiB, %.0f MiB per crop, workspace %.0f MiB", restorer.name, restorer.size,
             device, weights / MIB, per_crop / MIB, workspace / MIB)
    return model


def calibrate_blend(blender, device: torch.device, run_dtype: torch.dtype, *, size: int, batch: int = 4
                    ) -> MemoryModel:
    """The temporal blend's memory, as a MemoryModel: ``weights`` what it holds whatever the
    batch (the most its tracks' states may take, ``blender.max_bytes``, and on a GPU the memory
    pool of its CUDA graphs, captured here for batches up to ``batch``); ``per_crop`` and
    ``workspace`` measured as ``calibrate`` measures a model's, from blends of ``size`` px
    crops that each continue a track (what a blend costs most). The tracks it made are dropped."""
    import numpy as np

    batch = max(2, batch)
    graphs = 0
    if device.type == "cuda":  # the graphs' pool: reserved by torch, outside its allocated figures
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        before = torch.cuda.memory_reserved(device)
        blender.prepare(device, batch)
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        graphs = max(torch.cuda.memory_reserved(device) - before, 0)
    # noise that moves a pixel between frames: every crop registers, warps and blends
    crops = np.random.default_rng(0).integers(0, 256, (batch, size, size, 3), dtype=np.uint8)
    restored_dtype = torch.uint8 if device.type == "cpu" else run_dtype  # as a restorer leaves them
    keys = [("calibration", k) for k in range(batch)]

    def blend(n: int, frame: int) -> None:
        inputs = torch.from_numpy(np.roll(crops[:n], frame, axis=2)).to(device)
        restored = inputs.to(restored_dtype)
        outputs = restored.to(torch.uint8)  # as the worker's blend thread holds them meanwhile
        blender.blend_batch(keys[:n], [frame] * n, [np.eye(3)[:2]] * n, inputs, restored, [False] * n,
                            run_dtype=run_dtype)
        del outputs

    try:
        blend(batch, 0)  # the states to continue (and whatever a first call sets up)
        blend(1, 1)
        many = peak_during(lambda: blend(batch, 2), device)
        one = peak_during(lambda: blend(1, 3), device)
    finally:
        blender.drop(("calibration",))
    per_crop = max((many - one) // (batch - 1), 1)
    model = MemoryModel(blender.max_bytes + graphs, per_crop, max(one - per_crop, 0))
    log.info("temporal blend at %d px on %s: states up to %.0f MiB, CUDA graphs %.0f MiB, %.1f MiB per crop, "
             "workspace %.1f MiB", size, device, blender.max_bytes / MIB, graphs / MIB, per_crop / MIB,
             model.workspace / MIB)
    return model


def device_total_mib(device: torch.device, configured_mib: int) -> int:
    """The budget of a device: the configured figure, else the GPU's total memory, else (a
    CPU) the machine's memory."""
    if configured_mib:
        return configured_mib
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[1] // MIB
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // MIB


# ---------------------------------------------------------------------- leases


class GpuBudget:
    """One holder's lease on one device's budget, renewed by a thread of its own from the
    first grant until ``release`` (loading a large model can outlast the lease's TTL).

    A lease that lapsed (Redis out of reach for longer than the TTL) is taken again; if
    another holder took the memory meanwhile, ``mib`` drops to 0 (the registry says so),
    ``lost`` is set and ``on_lost(mib)`` called, so that the holder can unload or shrink and
    wait; the renewing thread keeps asking for what it held until it has it back."""

    def __init__(self, redis, key: str, holder: str, total_mib: int, ttl_s: float = LEASE_TTL_S):
        self.redis, self.key, self.holder = redis, key, holder
        self.total_mib, self.ttl_ms = total_mib, int(ttl_s * 1000)
        self._acquire = redis.register_script(ACQUIRE_LUA)
        self._renew = redis.register_script(RENEW_LUA)
        self.mib = 0  # what we hold now
        self.wanted = 0  # what we should hold (what we held before a lapse)
        self.lost = threading.Event()  # set while a lapsed lease could not be taken again
        self.on_lost = None  # called with the MiB lost, when that happens
        self._stop = threading.Event()
        self._released = False
        self._thread: threading.Thread | None = None
        # one change at a time: the renewing thread's re-take of what it held must not undo a
        # shrink the model thread made meanwhile, nor bring a lease back after release()
        self._lock = threading.RLock()

    def acquire(self, mib: int) -> bool:
        """Hold ``mib`` (replacing what we held); False if the device cannot spare it (or the
        lease was released for good)."""
        with self._lock:
            if self._released:
                return False
            ok, free = self._acquire(keys=[self.key], args=[self.holder, int(mib), self.ttl_ms, self.total_mib])
            if ok:
                self.mib = self.wanted = int(mib)
                self.lost.clear()
                if self._thread is None:
                    self._thread = threading.Thread(target=self._keep, name="memory-lease", daemon=True)
                    self._thread.start()
            else:
                log.info("memory budget %s: %d MiB wanted, %d MiB free", self.key, mib, free)
            return bool(ok)

    def _keep(self) -> None:
        while not self._stop.wait(self.ttl_ms / 3000):
            try:
                self.renew()
            except Exception as exc:  # Redis away: the lease may lapse; acquire() again when it is back
                log.warning("could not renew the memory lease on %s: %s", self.key, exc)

    def renew(self) -> bool:
        """Extend the lease; if it lapsed, take it again. False when that failed: then we hold
        nothing (see the class docstring)."""
        with self._lock:
            if not self.wanted:
                return True
            if self.mib and self._renew(keys=[self.key], args=[self.holder, self.ttl_ms]):
                return True
            if self.mib:
                log.warning("memory lease on %s expired; taking it again", self.key)
            if self.acquire(self.wanted):
                return True
            if not self.lost.is_set():
                held, self.mib = self.mib, 0
                log.error("memory lease on %s lapsed and other holders took the memory: %d MiB no longer held",
                          self.key, held)
                self.lost.set()
                if self.on_lost is not None:
                    self.on_lost(held)
            return False

    def release(self) -> None:
        with self._lock:
            self._stop.set()
            self._released = True
            self.wanted = 0
            self.redis.hdel(self.key, f"lease:{self.holder}", f"total:{self.holder}")
            self.mib = 0


def leases(redis, key: str) -> dict[str, int]:
    """Live leases of a device: holder -> MiB (expired ones left out)."""
    now_ms = int(time.time() * 1000)
    out = {}
    for name, value in redis.hgetall(key).items():
        name = name.decode() if isinstance(name, bytes) else name
        if name.startswith("lease:"):
            mib, expires = (value.decode() if isinstance(value, bytes) else value).split(":")
            if int(expires) >= now_ms:
                out[name[6:]] = int(mib)
    return out


# ---------------------------------------------------------------------- a worker inside its lease

WAIT_FOR_MEMORY_S = 2.0  # how often a worker that could not get its lease asks again


def checkpoint_bytes(name: str, weights, dtype: torch.dtype) -> int:
    """The weights' size at the run dtype, read from the checkpoint's tensor shapes (nothing is
    loaded onto the device)."""
    from gpen.checkpoint import read_state_dict
    from gpen.weights import locate

    from workers.restorers import needs_weights

    if not needs_weights(name):
        return 0
    state = read_state_dict(locate(name, weights, allow_download=False), mmap=True)
    return sum(t.numel() for t in state.values()) * torch.empty((), dtype=dtype).element_size()


def reserve_for_loading(budget: GpuBudget, name: str, settings, dtype: torch.dtype, stop=None) -> None:
    """Before a model is loaded: hold what we hold plus twice its weights (the weights, and
    room for the calibration batches that measure its activations), waiting until the device
    can spare it."""
    need = budget.mib + -(-2 * checkpoint_bytes(name, settings.models.get(name), dtype) // MIB)
    _acquire_waiting(budget, need, f"loading {name}", stop)


def fit_batch(budget: GpuBudget, restorers: dict, device: torch.device, cap: int, stop=None,
              measured: dict | None = None, blend: MemoryModel | None = None) -> int:
    """Measure each model, then hold exactly what the largest batch that fits needs (all models
    at that batch, and the temporal ``blend`` at that batch: ``calibrate_blend``), never less
    than batch 1: a worker that cannot have that waits. The measurements go into ``measured``
    (name -> MemoryModel) when given."""
    models = [calibrate(r, device, weights=r.weights_bytes(), batch=cap) for r in restorers.values()]
    if measured is not None:
        measured.update(zip(restorers, models))
    if blend is not None:
        models.append(blend)
    for batch in range(cap, 0, -1):
        need = -(-sum(m.needed(batch) for m in models) // MIB)
        if budget.acquire(need):
            if batch < cap:
                log.warning("memory budget: batch %d instead of %d (%d MiB leased)", batch, cap, need)
            return batch
    _acquire_waiting(budget, -(-sum(m.needed(1) for m in models) // MIB), "batch 1", stop)
    return 1


def _acquire_waiting(budget: GpuBudget, mib: int, what: str, stop) -> None:
    while not budget.acquire(mib):
        log.warning("waiting for %d MiB on %s (%s); other workers hold the rest", mib, budget.key, what)
        if stop is not None and stop.wait(WAIT_FOR_MEMORY_S):
            raise InterruptedError("stopped while waiting for memory")
        if stop is None:
            time.sleep(WAIT_FOR_MEMORY_S)
