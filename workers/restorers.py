"""Face restorers a worker can run, behind one interface: a batch of aligned uint8 RGB crops
in, the same shape out. Also where model names, crop sizes, devices and dtypes are decided.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from configs.errors import InputError
from gpen.checkpoint import RELEASED_CONFIGS
from workers import metrics

log = logging.getLogger(__name__)

IDENTITY = "identity"
IDENTITY_SIZE = 512  # the default model's crop size, so identity runs test the same geometry
GPEN_SIZES = {name: cfg.size for name, cfg in RELEASED_CONFIGS.items()}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class ModelUnavailable(InputError):
    """The model cannot be served here (unknown name, missing or bad weights)."""


def _unknown(model: str) -> ModelUnavailable:
    return ModelUnavailable(f"unknown model '{model}'; use one of {', '.join([*GPEN_SIZES, IDENTITY])}")


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelUnavailable(f"device {device} requested but CUDA is not available")
    return dev


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """auto: float16 on CUDA (the latent path stays float32 inside the model), float32 on CPU."""
    if dtype == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return DTYPES[dtype]


def needs_weights(model: str) -> bool:
    """False for the diagnostic restorers (identity, stand-ins), which have no checkpoint."""
    return model != IDENTITY and not STANDIN.match(model)


def crop_size(model: str, weights: str | Path | None = None) -> int:
    """The aligned crop size a model takes."""
    if model == IDENTITY:
        return IDENTITY_SIZE
    if standin := STANDIN.match(model):
        return int(standin[3])
    if weights is not None:
        from gpen.checkpoint import infer_config, read_state_dict

        return infer_config(read_state_dict(weights, mmap=True)).size
    if model in GPEN_SIZES:
        return GPEN_SIZES[model]
    raise _unknown(model)


@dataclass
class Restorer:
    name: str
    size: int
    max_batch: int | None = field(default=None, init=False)  # lowered after an out-of-memory error
    device = torch.device("cpu")  # where restore_on_device leaves its outputs
    dtype = torch.float32  # what they are held in

    def restore(self, crops: np.ndarray) -> np.ndarray:
        """crops: N x S x S x 3 uint8 RGB -> same shape and dtype."""
        raise NotImplementedError

    def restore_on_device(self, crops: np.ndarray | torch.Tensor) -> torch.Tensor:
        """``restore`` with the outputs left on ``device`` for the work that follows there
        (temporal blending): N x S x S x 3, uint8 or ``dtype`` holding whole numbers 0..255.
        ``crops`` may be a uint8 tensor on ``device`` already (a worker uploads a batch once,
        for the model and the blend)."""
        return torch.from_numpy(self.restore(torch.as_tensor(crops).cpu().numpy()))

    def weights_bytes(self) -> int:
        """Memory its weights take on the device (0 for restorers without any)."""
        return 0

    def run(self, crops: np.ndarray | torch.Tensor, *, on_device: bool = False) -> np.ndarray | torch.Tensor:
        """``restore`` in chunks of at most ``max_batch``; an out-of-memory error halves the
        chunk and the same crops are tried again (none is lost, the job goes on), down to one
        crop at a time. The smaller batch is kept from then on. ``on_device``: the outputs of
        ``restore_on_device``, joined on the device."""
        restore = self.restore_on_device if on_device else self.restore
        step = min(len(crops), self.max_batch or len(crops))
        out, start = [], 0
        while start < len(crops):
            try:
                out.append(restore(crops[start:start + step]))
                start += step
            except torch.OutOfMemoryError:
                if step == 1:
                    raise
                step = max(1, step // 2)
                self.max_batch = step
                metrics.OOM_RETRIES.labels(model=self.name).inc()
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()  # give the failed batch's blocks back before the retry
                log.warning("out of memory: %s batch reduced to %d; the same crops again", self.name, step)
        if len(out) == 1:
            return out[0]
        return torch.cat(out) if on_device else np.concatenate(out)


class IdentityRestorer(Restorer):
    """Returns its input: tests alignment, transport and paste-back without a network."""

    def restore(self, crops: np.ndarray) -> np.ndarray:
        return crops.copy()


class StandInRestorer(IdentityRestorer):
    """Identity that takes as long as a GPU would: ``base_ms`` per call plus ``per_crop_ms`` per
    crop, spent sleeping (so it costs no CPU). Named ``standin-<base>+<per crop>ms-<size>px``,
    e.g. ``standin-8+2ms-128px``: for benchmarks of scheduling and scaling, and for tests."""

    def __init__(self, name: str, size: int, base_ms: float, per_crop_ms: float,
                 device: torch.device = torch.device("cpu"), dtype: torch.dtype = torch.float32):
        super().__init__(name, size)
        self.base_s, self.per_crop_s = base_ms / 1000, per_crop_ms / 1000
        self.device, self.dtype = device, dtype

    def restore(self, crops: np.ndarray) -> np.ndarray:
        time.sleep(self.base_s + self.per_crop_s * len(crops))
        return crops.copy()

    def restore_on_device(self, crops: np.ndarray | torch.Tensor) -> torch.Tensor:
        """On a GPU, like a model there: the outputs on the device, in its run dtype."""
        time.sleep(self.base_s + self.per_crop_s * len(crops))
        crops = torch.as_tensor(crops)
        return crops.clone() if self.device.type == "cpu" else crops.to(self.device).to(self.dtype)


STANDIN = re.compile(r"^standin-(\d+(?:\.\d+)?)\+(\d+(?:\.\d+)?)ms-(\d+)px$")


class GPENRestorer(Restorer):
    def __init__(self, name: str, weights: Path, device: torch.device, dtype: torch.dtype):
        from gpen.checkpoint import CheckpointError, load_generator

        try:
            self.model = load_generator(weights, device=device, dtype=dtype)
        except CheckpointError as exc:
            raise ModelUnavailable(f"{name}: {exc}") from None
        super().__init__(name, self.model.config.size)
        self.device, self.dtype = device, dtype

    def weights_bytes(self) -> int:
        from workers.budget import weights_bytes

        return weights_bytes(self.model)

    def restore(self, crops: np.ndarray) -> np.ndarray:
        return self.restore_on_device(crops).to(torch.uint8).contiguous().cpu().numpy()

    @torch.inference_mode()
    def restore_on_device(self, crops: np.ndarray | torch.Tensor) -> torch.Tensor:
        x = torch.as_tensor(crops).to(self.device, non_blocking=True)
        x = x.permute(0, 3, 1, 2).to(self.dtype) * (2 / 255) - 1  # uint8 RGB -> [-1, 1]
        y = self.model(x)
        y = ((y.float().clamp_(-1, 1) + 1) * 127.5).round_()  # rounds; GPEN truncates
        return y.to(self.dtype).permute(0, 2, 3, 1)  # whole numbers 0..255: exact in 16-bit floats too


def build_restorer(model: str, *, device: torch.device, dtype: torch.dtype,
                   weights: str | Path | None = None, allow_download: bool = True) -> Restorer:
    """The restorer for ``model``; GPEN weights come from ``weights`` or the weight cache."""
    if model == IDENTITY:
        return IdentityRestorer(IDENTITY, IDENTITY_SIZE)
    if standin := STANDIN.match(model):
        return StandInRestorer(model, int(standin[3]), float(standin[1]), float(standin[2]), device, dtype)
    if weights is None and model not in GPEN_SIZES:
        raise _unknown(model)
    from gpen.weights import WeightsError, locate

    try:
        return GPENRestorer(model, locate(model, weights, allow_download=allow_download), device, dtype)
    except WeightsError as exc:
        raise ModelUnavailable(str(exc)) from None
