"""The official formulation of GPEN's forward pass, computed from a ``FullGenerator``'s
parameters: per-sample grouped modulated convolutions and upfirdn2d done as in GPEN's CPU
fallback (zero-insertion and padding on a [N*C, 1, H, W] view, one single-channel conv).

``gpen.model`` computes the same maths in a faster order; this module is the yardstick the
tests compare it with and the baseline that ``bench/gpen_model.py`` times it against.
Like the official code, everything runs in one dtype (float32 unless asked otherwise).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as F

from gpen.model import (ACTIVATION_GAIN, EPS, LEAKY_SLOPE, EqualLinear, FullGenerator, ModulatedConv2d,
                        StyledConv, ToRGB)


def upfirdn2d(x: Tensor, kernel: Tensor, up: int = 1, down: int = 1, pad: tuple[int, int] = (0, 0)) -> Tensor:
    n, c, h, w = x.shape
    out = x.reshape(n * c, 1, h, 1, w, 1)
    out = F.pad(out, [0, up - 1, 0, 0, 0, up - 1])  # zero-insertion
    out = out.reshape(n * c, 1, h * up, w * up)
    out = F.pad(out, [pad[0], pad[1], pad[0], pad[1]])
    out = F.conv2d(out, torch.flip(kernel, [0, 1])[None, None])
    out = out[:, :, ::down, ::down]
    return out.reshape(n, c, out.shape[-2], out.shape[-1])


def fused_leaky_relu(x: Tensor, bias: Tensor) -> Tensor:
    shape = (1, -1) + (1,) * (x.ndim - 2)
    return F.leaky_relu(x + bias.view(shape), LEAKY_SLOPE) * ACTIVATION_GAIN


def equal_linear(layer: EqualLinear, x: Tensor) -> Tensor:
    out = F.linear(x, layer.weight * layer.scale)
    if layer.activate:
        return fused_leaky_relu(out, layer.bias * layer.lr_mul)
    return out + layer.bias * layer.lr_mul


def modulated_conv(layer: ModulatedConv2d, x: Tensor, w: Tensor) -> Tensor:
    batch, in_ch, h, wd = x.shape
    out_ch, k = layer.weight.shape[1], layer.weight.shape[-1]
    style = equal_linear(layer.modulation, w).view(batch, 1, in_ch, 1, 1)
    weight = layer.scale * layer.weight * style
    if layer.demodulate:
        weight = weight * torch.rsqrt(weight.pow(2).sum([2, 3, 4]) + EPS).view(batch, out_ch, 1, 1, 1)
    if layer.upsample:
        weight = weight.transpose(1, 2).reshape(batch * in_ch, out_ch, k, k)
        out = F.conv_transpose2d(x.reshape(1, batch * in_ch, h, wd), weight, padding=0, stride=2, groups=batch)
        out = out.view(batch, out_ch, *out.shape[2:])
        return upfirdn2d(out, layer.blur.kernel, pad=layer.blur.pad)
    out = F.conv2d(x.reshape(1, batch * in_ch, h, wd), weight.view(batch * out_ch, in_ch, k, k),
                   padding=layer.padding, groups=batch)
    return out.view(batch, out_ch, *out.shape[2:])


def styled_conv(layer: StyledConv, x: Tensor, w: Tensor, feature: Tensor) -> Tensor:
    out = modulated_conv(layer.conv, x, w)
    out = torch.cat([out, layer.noise.weight * feature], dim=1)
    return fused_leaky_relu(out, layer.activate.bias)


def to_rgb(layer: ToRGB, x: Tensor, w: Tensor, skip: Tensor | None = None) -> Tensor:
    out = modulated_conv(layer.conv, x, w) + layer.bias
    if skip is not None:
        out = out + upfirdn2d(skip, layer.upsample.kernel, up=2, pad=(2, 1))
    return out


@torch.no_grad()
def reference_forward(model: FullGenerator, x: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """The official computation on ``model``'s weights, all in ``dtype``."""
    if model.compute_dtype != dtype or any(p.dtype != dtype for p in model.parameters()):
        model = _as_dtype(model, dtype)
    cfg = model.config
    x = x.to(dtype)
    features = []
    for j in range(cfg.log_size - 1):
        block = getattr(model, f"ecd{j}")[0]
        if j == 0:
            conv, act = block
        else:
            blur, conv, act = block
            x = upfirdn2d(x, blur.kernel, pad=blur.pad)
        x = fused_leaky_relu(F.conv2d(x, conv.weight * conv.scale, stride=conv.stride, padding=conv.padding),
                             act.bias)
        features.append(x)
    code = equal_linear(model.final_linear[0], x.reshape(x.shape[0], -1))
    gen = model.generator
    w = code * torch.rsqrt(torch.mean(code**2, dim=1, keepdim=True) + EPS)  # PixelNorm
    for layer in list(gen.style)[1:]:
        w = equal_linear(layer, w)
    features = features[::-1]
    out = gen.input.input.repeat(x.shape[0], 1, 1, 1)
    out = styled_conv(gen.conv1, out, w, features[0])
    skip = to_rgb(gen.to_rgb1, out, w)
    for i, rgb_layer in enumerate(gen.to_rgbs):
        out = styled_conv(gen.convs[2 * i], out, w, features[i + 1])
        out = styled_conv(gen.convs[2 * i + 1], out, w, features[i + 1])
        skip = to_rgb(rgb_layer, out, w, skip)
    return skip


def _as_dtype(model: FullGenerator, dtype: torch.dtype) -> FullGenerator:
    clone = FullGenerator(model.config).to(model.compute_dtype)
    clone.load_state_dict(model.state_dict())
    return clone.to(dtype).eval()
