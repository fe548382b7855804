"""Reading GPEN checkpoints: official ``GPEN-BFR-*.pth`` files, ModelScope ``.pt`` files and
training snapshots wrapped as ``{'g_ema': state_dict}``. The layout (size, channel widths,
style size, mapping depth) is read off the tensor shapes, then the whole state dict is
checked key by key and loaded with ``strict=True``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path

import torch

from configs.errors import InputError
from gpen.model import FullGenerator, GPENConfig

# The released checkpoints (see GPEN's run.sh and ModelScope's pipeline).
RELEASED_CONFIGS: dict[str, GPENConfig] = {
    "GPEN-BFR-256": GPENConfig(256, channel_multiplier=1, narrow=0.5),
    "GPEN-BFR-512": GPENConfig(512, channel_multiplier=2, narrow=1),
    "GPEN-BFR-1024": GPENConfig(1024, channel_multiplier=2, narrow=1),
    "GPEN-BFR-2048": GPENConfig(2048, channel_multiplier=2, narrow=1),
}
WRAPPER_KEYS = ("g_ema",)


class CheckpointError(InputError, ValueError):
    """The file or state dict is not a GPEN generator checkpoint we can load."""


def read_state_dict(source: str | os.PathLike | Mapping[str, torch.Tensor], *,
                    mmap: bool = False) -> dict[str, torch.Tensor]:
    """A plain ``{name: tensor}`` dict from a path or a (possibly wrapped) mapping.
    Files are read with ``weights_only=True``: a checkpoint can never run code. ``mmap`` maps
    the tensors instead of reading them (enough to look at shapes; zip-format files only)."""
    if isinstance(source, Mapping):
        obj = source
    else:
        path = Path(source)
        if not path.is_file():
            raise CheckpointError(f"checkpoint not found: {path}")
        try:
            try:
                obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
            except RuntimeError:
                if not mmap:
                    raise
                obj = torch.load(path, map_location="cpu", weights_only=True)  # a legacy (non-zip) file
        except Exception as exc:  # torch raises many types for corrupt or unsafe files
            raise CheckpointError(f"{path} is not a readable PyTorch weights file ({type(exc).__name__}: "
                                  f"{str(exc).splitlines()[0][:200]})") from None
    for key in WRAPPER_KEYS:
        if isinstance(obj, Mapping) and key in obj and isinstance(obj[key], Mapping):
            obj = obj[key]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError("checkpoint does not hold a state dict of tensors "
                              f"(top-level keys: {list(obj)[:8] if isinstance(obj, Mapping) else type(obj).__name__})")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def infer_config(state: Mapping[str, torch.Tensor]) -> GPENConfig:
    """The FullGenerator layout that produced ``state``, read from tensor shapes."""
    def shape(key: str) -> tuple[int, ...]:
        if key not in state:
            raise CheckpointError(f"not a GPEN generator state dict: no '{key}' "
                                  f"(first keys: {list(state)[:6]})")
        return tuple(state[key].shape)

    n_encoder = len({m.group(1) for k in state if (m := re.match(r"ecd(\d+)\.", k))})
    if n_encoder < 2:
        raise CheckpointError("not a GPEN generator state dict: no encoder layers 'ecd0', 'ecd1', ...")
    size = 2 ** (n_encoder + 1)
    style_dim = shape("final_linear.0.weight")[0]
    n_mlp = len({m.group(1) for k in state if (m := re.match(r"generator\.style\.(\d+)\.weight", k))})
    narrow = shape("generator.input.input")[1] / 512
    multiplier: float = 1
    if size >= 64:
        # channels at 64px = 256 * channel_multiplier * narrow; the encoder's last-but-4 layer
        # outputs 64px features: ecd{L-6}'s conv is [C64, C128, 3, 3].
        log_size = n_encoder + 1
        c64 = shape(f"ecd{log_size - 6}.0.1.weight")[0] if log_size > 6 else shape("ecd0.0.0.weight")[0]
        multiplier = c64 / (256 * narrow)
    try:
        cfg = GPENConfig(size, channel_multiplier=multiplier, narrow=narrow, style_dim=style_dim, n_mlp=n_mlp)
    except ValueError as exc:
        raise CheckpointError(f"not a GPEN generator layout: {exc}") from None
    _check_layout(cfg, state)
    return cfg


def _check_layout(cfg: GPENConfig, state: Mapping[str, torch.Tensor]) -> None:
    expected = {k: tuple(v.shape) for k, v in FullGenerator(cfg).to("meta").state_dict().items()}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [f"{k}: {tuple(state[k].shape)} != {expected[k]}" for k in expected
             if k in state and tuple(state[k].shape) != expected[k]]
    if missing or unexpected or wrong:
        lines = [f"state dict matches no GPEN layout (closest: size {cfg.size}, "
                 f"channel_multiplier {cfg.channel_multiplier:g}, narrow {cfg.narrow:g})"]
        for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
            if items:
                lines.append(f"  {label} ({len(items)}): {', '.join(items[:5])}{' ...' if len(items) > 5 else ''}")
        raise CheckpointError("\n".join(lines))


def release_name(cfg: GPENConfig) -> str | None:
    """'GPEN-BFR-512' when ``cfg`` is a released layout, else None."""
    return next((name for name, c in RELEASED_CONFIGS.items() if c == cfg), None)


def load_generator(source: str | os.PathLike | Mapping[str, torch.Tensor], *, device: str | torch.device = "cpu",
                   dtype: torch.dtype = torch.float32) -> FullGenerator:
    """Build GPEN's FullGenerator for ``source`` (a checkpoint path or state dict), load the
    weights strictly and return it in eval mode on ``device``.

    ``dtype`` is the convolutions' compute dtype: float32, float16 (CUDA) or bfloat16. The
    latent path stays float32 whatever ``dtype`` is. ``model(x)`` takes N x 3 x S x S RGB in
    [-1, 1] and returns the same shape, raw and unclamped, like the official network.
    """
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"unsupported dtype {dtype}; use float32, float16 or bfloat16")
    state = read_state_dict(source)
    cfg = infer_config(state)
    model = FullGenerator(cfg)
    model.load_state_dict(state, strict=True)
    model.eval().requires_grad_(False)
    return model.to(device).set_compute_dtype(dtype)
