"""Face restorers a worker can run, behind one interface: a batch of aligned uint8 RGB crops
in, the same shape out. Also where model names, crop sizes, devices and dtypes are decided.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from gpen.checkpoint import RELEASED_CONFIGS

log = logging.getLogger(__name__)

IDENTITY = "identity"
IDENTITY_SIZE = 512  # the default model's crop size, so identity runs test the same geometry
GPEN_SIZES = {name: cfg.size for name, cfg in RELEASED_CONFIGS.items()}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class ModelUnavailable(RuntimeError):
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


def crop_size(model: str, weights: str | Path | None = None) -> int:
    """The aligned crop size a model takes."""
    if model == IDENTITY:
        return IDENTITY_SIZE
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

    def restore(self, crops: np.ndarray) -> np.ndarray:
        """crops: N x S x S x 3 uint8 RGB -> same shape and dtype."""
        raise NotImplementedError


class IdentityRestorer(Restorer):
    """Returns its input: tests alignment, transport and paste-back without a network."""

    def restore(self, crops: np.ndarray) -> np.ndarray:
        return crops.copy()


class GPENRestorer(Restorer):
    def __init__(self, name: str, weights: Path, device: torch.device, dtype: torch.dtype):
        from gpen.checkpoint import CheckpointError, load_generator

        try:
            self.model = load_generator(weights, device=device, dtype=dtype)
        except CheckpointError as exc:
            raise ModelUnavailable(f"{name}: {exc}") from None
        super().__init__(name, self.model.config.size)
        self.device, self.dtype = device, dtype
        self.max_batch: int | None = None  # lowered after an out-of-memory error

    @torch.inference_mode()
    def restore(self, crops: np.ndarray) -> np.ndarray:
        step = min(len(crops), self.max_batch or len(crops))
        out, start = [], 0
        while start < len(crops):
            try:
                out.append(self._forward(crops[start:start + step]))
                start += step
            except torch.OutOfMemoryError:
                if step == 1:
                    raise
                step = max(1, step // 2)
                self.max_batch = step
                torch.cuda.empty_cache()
                log.warning("out of memory: %s batch reduced to %d", self.name, step)
        return np.concatenate(out)

    def _forward(self, crops: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(crops).to(self.device, non_blocking=True)
        x = x.permute(0, 3, 1, 2).to(self.dtype) * (2 / 255) - 1  # uint8 RGB -> [-1, 1]
        y = self.model(x)
        y = ((y.float().clamp_(-1, 1) + 1) * 127.5).round_().to(torch.uint8)  # rounds; GPEN truncates
        return y.permute(0, 2, 3, 1).contiguous().cpu().numpy()


def build_restorer(model: str, *, device: torch.device, dtype: torch.dtype,
                   weights: str | Path | None = None, allow_download: bool = True) -> Restorer:
    """The restorer for ``model``; GPEN weights come from ``weights`` or the weight cache."""
    if model == IDENTITY:
        return IdentityRestorer(IDENTITY, IDENTITY_SIZE)
    if weights is None and model not in GPEN_SIZES:
        raise _unknown(model)
    from gpen.weights import WeightsError, locate

    try:
        return GPENRestorer(model, locate(model, weights, allow_download=allow_download), device, dtype)
    except WeightsError as exc:
        raise ModelUnavailable(str(exc)) from None
