"""Official-layout GPEN state dicts with deterministic values, for tests and benchmarks.

The real weights cannot be fetched everywhere (and their licence is non-commercial), so the
test suite builds the official key/shape layout from the specification below (written from
GPEN's key table, independently of ``gpen.model``) and fills it with reproducible values:
a counter-based generator (splitmix64 + Box-Muller) seeded by each key's name, identical on
every platform and library version.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch

from gpen.model import GPENConfig, fir_kernel

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def official_key_shapes(cfg: GPENConfig) -> dict[str, tuple[int, ...]]:
    """Key -> shape of the official FullGenerator state dict, from GPEN's key table."""
    c, sd, log_size = cfg.channels, cfg.style_dim, cfg.log_size
    shapes: dict[str, tuple[int, ...]] = {
        "ecd0.0.0.weight": (c(cfg.size), 3, 1, 1),
        "ecd0.0.1.bias": (c(cfg.size),),
    }
    for j in range(1, log_size - 1):
        cin, cout = c(cfg.size >> (j - 1)), c(cfg.size >> j)
        shapes |= {f"ecd{j}.0.0.kernel": (4, 4), f"ecd{j}.0.1.weight": (cout, cin, 3, 3), f"ecd{j}.0.2.bias": (cout,)}
    shapes |= {"final_linear.0.weight": (sd, c(4) * 16), "final_linear.0.bias": (sd,)}
    for i in range(1, cfg.n_mlp + 1):
        shapes |= {f"generator.style.{i}.weight": (sd, sd), f"generator.style.{i}.bias": (sd,)}
    shapes["generator.input.input"] = (1, c(4), 4, 4)

    def styled(prefix: str, cin: int, cout: int, upsample: bool) -> None:
        shapes.update({f"{prefix}.conv.weight": (1, cout, cin, 3, 3),
                       f"{prefix}.conv.modulation.weight": (cin, sd), f"{prefix}.conv.modulation.bias": (cin,),
                       f"{prefix}.noise.weight": (1,), f"{prefix}.activate.bias": (2 * cout,)})
        if upsample:
            shapes[f"{prefix}.conv.blur.kernel"] = (4, 4)

    def to_rgb(prefix: str, cin: int, upsample: bool) -> None:
        shapes.update({f"{prefix}.conv.weight": (1, 3, cin, 1, 1), f"{prefix}.conv.modulation.weight": (cin, sd),
                       f"{prefix}.conv.modulation.bias": (cin,), f"{prefix}.bias": (1, 3, 1, 1)})
        if upsample:
            shapes[f"{prefix}.upsample.kernel"] = (4, 4)

    styled("generator.conv1", c(4), c(4), False)
    to_rgb("generator.to_rgb1", 2 * c(4), False)
    for i, log_res in enumerate(range(3, log_size + 1)):
        cin, cout = c(2 ** (log_res - 1)), c(2**log_res)
        styled(f"generator.convs.{2 * i}", 2 * cin, cout, True)
        styled(f"generator.convs.{2 * i + 1}", 2 * cout, cout, False)
        to_rgb(f"generator.to_rgbs.{i}", 2 * cout, True)
    return shapes


def _splitmix64(counter: np.ndarray) -> np.ndarray:
    z = counter * _GOLDEN
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def deterministic_normal(shape: tuple[int, ...], key: str, seed: int = 0) -> np.ndarray:
    """Standard normal float32 values that depend only on (key, seed, index)."""
    n = int(np.prod(shape, dtype=np.int64))
    base = int.from_bytes(hashlib.sha256(f"{seed}:{key}".encode()).digest()[:8], "little")
    pairs = (n + 1) // 2
    with np.errstate(over="ignore"):
        counter = np.arange(pairs, dtype=np.uint64) * np.uint64(2) + np.uint64(base)
        u1 = (_splitmix64(counter) >> np.uint64(11)).astype(np.float64) * 2.0**-53
        u2 = (_splitmix64(counter + np.uint64(1)) >> np.uint64(11)).astype(np.float64) * 2.0**-53
    radius = np.sqrt(-2.0 * np.log1p(-u1))  # 1 - u1 is in (0, 1]
    z = np.concatenate([radius * np.cos(2 * np.pi * u2), radius * np.sin(2 * np.pi * u2)])[:n]
    return z.astype(np.float32).reshape(shape)


def _value(key: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    if key.endswith(".kernel"):  # the FIR constants, exactly as the official code makes them
        gain = 1 if key.startswith("ecd") else 4
        return fir_kernel() * gain
    z = torch.from_numpy(deterministic_normal(shape, key, seed))
    if key.startswith("generator.style.") and key.endswith(".weight"):
        return z / 0.01  # stored divided by lr_mul, like the official init
    if key.startswith("generator.style.") and key.endswith(".bias"):
        return 0.1 * z / 0.01
    if key.endswith("modulation.bias"):
        return 1.0 + 0.1 * z  # official init is 1: styles near 1
    if key.endswith("noise.weight"):
        return 0.3 * z  # non-zero, so the encoder skips are exercised (official init is 0)
    if key.endswith(".bias"):
        return 0.1 * z
    return z


def deterministic_state_dict(cfg: GPENConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """An official-layout FullGenerator state dict with reproducible, well-scaled values."""
    return {k: _value(k, s, seed) for k, s in official_key_shapes(cfg).items()}


def deterministic_input(batch: int, size: int, seed: int = 0) -> torch.Tensor:
    """A reproducible N x 3 x S x S image in [-1, 1]: smooth gradients plus texture."""
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    smooth = torch.stack([xx, yy, xx * yy])[None] * 0.6
    noise = torch.from_numpy(deterministic_normal((batch, 3, size, size), "input", seed))
    return (smooth + 0.3 * noise).clamp(-1, 1)
