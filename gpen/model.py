"""GPEN's generator (Yang et al., "GAN Prior Embedded Network for Blind Face Restoration in the
Wild", CVPR 2021), in plain PyTorch.

GPEN is a U-shaped network:
  encoder   a plain conv net that takes the degraded face down to 4x4 and to one latent code;
  mapping   StyleGAN2's 8-layer MLP, applied to that code (w = mapping(code));
  decoder   a StyleGAN2 synthesis network driven by w, whose per-layer "noise" inputs are the
            encoder's feature maps at the same resolution, concatenated to the activations.

Module and attribute names follow the official state-dict layout exactly (``ecd0.0.0.weight``,
``generator.convs.3.conv.modulation.bias``, ...), so the released checkpoints load with
``strict=True``. The maths is the official one (``tests.support.reference`` computes it the official
way and the tests hold the two together); this module computes it in a cheaper order:

- a modulated conv scales whichever is smaller, the weights or the activations;
- a bias that precedes an activation is added by the convolution itself;
- sqrt(2) * leaky_relu(y) == leaky_relu(sqrt(2) * y), so the activation gain is folded into
  the weights and biases that produce y, and the activation runs in place;
- activations are channels-last (oneDNN's and cuDNN's fast layout), 1x1 convs are matmuls.
No custom CUDA ops: the FIR filters are depthwise convolutions.

Precision: the latent path (encoder head, mapping network, style affines and the
demodulation sums) always runs in float32, because PixelNorm and the sums of squared weights
overflow in half precision. The convolutions run in the model's compute dtype (float32,
float16 on CUDA, bfloat16 on CPU).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

BLUR_TAPS = (1, 3, 3, 1)
LEAKY_SLOPE = 0.2
ACTIVATION_GAIN = math.sqrt(2.0)  # keeps the activation's variance after a leaky ReLU
EPS = 1e-8


@dataclass(frozen=True)
class GPENConfig:
    """One FullGenerator layout. ``channels`` follows the official table."""

    size: int
    channel_multiplier: float = 2
    narrow: float = 1.0
    style_dim: int = 512
    n_mlp: int = 8

    def __post_init__(self) -> None:
        if self.size < 8 or self.size & (self.size - 1):
            raise ValueError(f"GPEN size must be a power of two >= 8, got {self.size}")

    @property
    def log_size(self) -> int:
        return int(math.log2(self.size))

    def channels(self, resolution: int) -> int:
        n, cm = self.narrow, self.channel_multiplier
        if resolution <= 32:
            return int(512 * n)
        base = {64: 256, 128: 128, 256: 64, 512: 32, 1024: 16, 2048: 8}[resolution]
        return int(base * cm * n)


def fir_kernel(taps=BLUR_TAPS) -> Tensor:
    """The separable 4x4 binomial low-pass filter, normalised to sum 1."""
    k = torch.tensor(taps, dtype=torch.float32)
    k = k[None, :] * k[:, None]
    return k / k.sum()


def _depthwise(kernel: Tensor, channels: int, like: Tensor) -> Tensor:
    # Flip: upfirdn2d convolves, conv2d correlates (the binomial kernel is symmetric anyway).
    k = torch.flip(kernel, [0, 1]).to(like.dtype)
    return k[None, None].expand(channels, 1, *k.shape)


def fir_filter(x: Tensor, kernel: Tensor, pad: tuple[int, int]) -> Tensor:
    """upfirdn2d with up=down=1: pad, then filter every channel with ``kernel``."""
    if pad[0] == pad[1]:  # the convolution pads by itself, saving a copy
        return F.conv2d(x, _depthwise(kernel, x.shape[1], x), padding=pad[0], groups=x.shape[1])
    x = F.pad(x, (pad[0], pad[1], pad[0], pad[1]))
    return F.conv2d(x, _depthwise(kernel, x.shape[1], x), groups=x.shape[1])


def fir_upsample2x(x: Tensor, kernel: Tensor) -> Tensor:
    """upfirdn2d(up=2, pad=(2, 1)) with a 4x4 kernel: zero-insertion, padding and filtering
    in one transposed convolution (padding=1 crops the same samples the pads leave out)."""
    return F.conv_transpose2d(x, _depthwise(kernel, x.shape[1], x), stride=2, padding=1, groups=x.shape[1])


def leaky_relu_(x: Tensor) -> Tensor:
    """In place; callers have already multiplied y by ACTIVATION_GAIN."""
    return F.leaky_relu_(x, LEAKY_SLOPE)


class PixelNorm(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x * torch.rsqrt(torch.mean(x * x, dim=1, keepdim=True) + EPS)


class EqualLinear(nn.Module):
    """Linear layer with the equalised learning rate: weights are stored divided by
    ``lr_mul / sqrt(in_dim)`` and scaled back at run time. Always computed in float32."""

    def __init__(self, in_dim: int, out_dim: int, *, lr_mul: float = 1.0, bias_init: float = 0.0,
                 activate: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_dim, in_dim) / lr_mul)
        self.bias = nn.Parameter(torch.full((out_dim,), float(bias_init)))
        self.scale = lr_mul / math.sqrt(in_dim)
        self.lr_mul = lr_mul
        self.activate = activate

    def forward(self, x: Tensor) -> Tensor:
        y = F.linear(x.float() * self.scale, self.weight.float(), self.bias.float() * self.lr_mul)
        return F.leaky_relu(y, LEAKY_SLOPE) * ACTIVATION_GAIN if self.activate else y


class EqualConv2d(nn.Module):
    """Convolution with the equalised learning rate and no bias of its own (the bias lives in
    the following FusedLeakyReLU, as in the official layout)."""

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int, *, stride: int = 1, padding: int = 0):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_ch, in_ch, kernel_size, kernel_size))
        self.scale = 1 / math.sqrt(in_ch * kernel_size**2)
        self.stride, self.padding = stride, padding

    def forward(self, x: Tensor, bias: Tensor | None = None, gain: float = 1.0) -> Tensor:
        """gain * (conv(x, W * scale) + bias)."""
        weight = self.weight.to(x.dtype) * (self.scale * gain)
        bias = None if bias is None else bias.to(x.dtype) * gain
        return F.conv2d(x, weight, bias, stride=self.stride, padding=self.padding)


class FusedLeakyReLU(nn.Module):
    """sqrt(2) * leaky_relu(x + bias): StyleGAN2's bias-and-activation. Its bias is usually
    handed to the preceding convolution (see the encoder blocks and StyledConv)."""

    def __init__(self, channels: int):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: Tensor) -> Tensor:
        return F.leaky_relu(x + self.bias.to(x.dtype)[None, :, None, None], LEAKY_SLOPE) * ACTIVATION_GAIN


class Blur(nn.Module):
    """FIR low-pass with fixed padding. ``kernel`` is a checkpoint buffer."""

    def __init__(self, pad: tuple[int, int], gain: float = 1.0):
        super().__init__()
        self.register_buffer("kernel", fir_kernel() * gain)
        self.pad = pad

    def forward(self, x: Tensor) -> Tensor:
        return fir_filter(x, self.kernel, self.pad)


class Upsample(nn.Module):
    """2x FIR upsampling of the RGB skip path."""

    def __init__(self):
        super().__init__()
        self.register_buffer("kernel", fir_kernel() * 4)  # x4 restores the energy lost to zero-insertion

    def forward(self, x: Tensor) -> Tensor:
        return fir_upsample2x(x, self.kernel)


# ---------------------------------------------------------------- encoder


class EncoderInput(nn.Sequential):
    """ecd0: a 1x1 convolution from RGB at full resolution, bias, leaky ReLU."""

    def __init__(self, out_ch: int):
        super().__init__(EqualConv2d(3, out_ch, 1), FusedLeakyReLU(out_ch))

    def forward(self, x: Tensor) -> Tensor:
        conv, act = self
        return leaky_relu_(conv(x, act.bias, gain=ACTIVATION_GAIN))


class EncoderDown(nn.Sequential):
    """ecd1..: blur, then a stride-2 3x3 convolution (anti-aliased downsampling), bias,
    leaky ReLU."""

    def __init__(self, in_ch: int, out_ch: int):
        # pads (2, 2): a 4-tap filter followed by a 3x3 stride-2 conv keeps H -> H/2
        super().__init__(Blur(pad=(2, 2)), EqualConv2d(in_ch, out_ch, 3, stride=2), FusedLeakyReLU(out_ch))

    def forward(self, x: Tensor) -> Tensor:
        blur, conv, act = self
        return leaky_relu_(conv(blur(x), act.bias, gain=ACTIVATION_GAIN))


# ---------------------------------------------------------------- StyleGAN2 decoder


class ModulatedConv2d(nn.Module):
    """StyleGAN2's style-modulated convolution.

    Paper form: every sample gets its own weights W'[o,i] = s[i] * W[o,i] * scale, demodulated
    by d[o] = rsqrt(sum_{i,k} W'[o,i,k]^2 + eps), then one grouped convolution for the batch.
    The same maths can modulate the activations instead: conv(x * s, W * scale) * d, which
    needs no per-sample weights. We take whichever touches less memory: per-sample weights
    for the narrow, high-resolution layers (weights << activations), modulated activations
    for the wide, low-resolution ones. Both compute s and d in float32.
    """

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int, style_dim: int, *,
                 demodulate: bool = True, upsample: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(1, out_ch, in_ch, kernel_size, kernel_size))
        self.modulation = EqualLinear(style_dim, in_ch, bias_init=1.0)
        self.scale = 1 / math.sqrt(in_ch * kernel_size**2)
        self.demodulate = demodulate
        self.upsample = upsample
        self.padding = kernel_size // 2
        if upsample:
            # After the stride-2 transposed 3x3 conv (H -> 2H+1): blur with pads (1, 1) -> 2H.
            self.blur = Blur(pad=(1, 1), gain=4)
        self._derived: dict[str, tuple[tuple, Tensor]] = {}

    def forward(self, x: Tensor, w: Tensor, bias: Tensor | None = None, gain: float = 1.0) -> Tensor:
        """gain * (modulated_conv(x, w) + bias); the bias is one value per output channel."""
        style = self.modulation(w)  # [B, in], float32
        if bias is not None:
            bias = bias.to(x.dtype) * gain
        if x.shape[0] * self.weight.numel() <= x[0].numel():
            out = self.modulate_weights(x, style, gain, None if self.upsample else bias)
        else:
            out = self.modulate_activations(x, style, gain, None if self.upsample else bias)
        if self.upsample:  # the blur sums 4x over the kernel, so the bias goes after it
            out = self.blur(out)
            return out if bias is None else out.add_(bias[None, :, None, None])
        return out

    def modulate_weights(self, x: Tensor, style: Tensor, gain: float, bias: Tensor | None) -> Tensor:
        weight = (self.scale * gain) * self.weight.float() * style[:, None, :, None, None]  # [B, out, in, k, k]
        if self.demodulate:
            energy = weight.square().sum(dim=(2, 3, 4)) / gain**2
            weight = weight * torch.rsqrt(energy + EPS)[:, :, None, None, None]
        weight = weight.to(x.dtype)
        if self.weight.shape[-1] == 1:
            return _pointwise(x, weight, bias)
        return torch.cat([self._conv(x[b:b + 1], weight[b], bias) for b in range(x.shape[0])])

    def modulate_activations(self, x: Tensor, style: Tensor, gain: float, bias: Tensor | None) -> Tensor:
        style = style * self.scale  # conv(x * s * scale, W) == conv(x * s, W * scale)
        if not self.demodulate:
            weight, transposed = self._weight_for(x.dtype)
            return self._conv(x * (style * gain).to(x.dtype)[:, :, None, None], weight, bias, transposed=transposed)
        w_energy = self._cached("energy", lambda w: w.float().square().sum(dim=(2, 3)))
        energy = style.square() @ w_energy.t()  # [B, out] = sum_{i,k} (s_i scale W_oik)^2
        demod = torch.rsqrt(energy + EPS) * gain
        # In half precision conv(x * s) can be far larger than its demodulated result; divide
        # the input by a per-sample norm so the intermediate stays near the output's range.
        norm = torch.rsqrt(energy.mean(dim=1, keepdim=True) + EPS)
        weight, transposed = self._weight_for(x.dtype)
        out = self._conv(x * (style * norm).to(x.dtype)[:, :, None, None], weight, None, transposed=transposed)
        out = out.mul_((demod / norm).to(out.dtype)[:, :, None, None])
        return out if bias is None else out.add_(bias[None, :, None, None])

    def _weight_for(self, dtype: torch.dtype) -> tuple[Tensor, bool]:
        """The shared weight in the layout the convolution wants (cached), and whether it is
        transposed: conv_transpose2d takes [in, out, k, k]."""
        if self.upsample:
            return self._cached(f"weight_t_{dtype}", lambda w: w.to(dtype).transpose(0, 1).contiguous()), True
        return self._cached(f"weight_{dtype}", lambda w: w.to(dtype)), False

    def _cached(self, name: str, make) -> Tensor:
        """A tensor derived from the (fixed) weights, kept until they change: loading a state
        dict clears the cache, moving or casting the module gives the weight new storage."""
        key = (self.weight.data_ptr(), self.weight.device, self.weight.dtype)
        hit = self._derived.get(name)
        if hit is None or hit[0] != key:
            with torch.no_grad():
                hit = self._derived[name] = (key, make(self.weight[0]))
        return hit[1]

    def _load_from_state_dict(self, *args, **kwargs):
        self._derived.clear()
        super()._load_from_state_dict(*args, **kwargs)

    def _conv(self, x: Tensor, weight: Tensor, bias: Tensor | None, *, transposed: bool = False) -> Tensor:
        """x [N, in, H, W] with one weight for all N: [out, in, k, k], or already
        [in, out, k, k] (``transposed``) for the upsampling conv."""
        if self.weight.shape[-1] == 1:
            return _pointwise(x, weight[None], bias)
        if self.upsample:
            return F.conv_transpose2d(x, weight if transposed else weight.transpose(0, 1), bias, stride=2)
        return F.conv2d(x, weight, bias, padding=self.padding)


def _pointwise(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """1x1 convolution as a matmul over channels-last pixels; weight [1 or N, out, in, 1, 1]."""
    pixels = x.permute(0, 2, 3, 1)  # a view: activations are channels-last
    out = torch.matmul(pixels.flatten(1, 2), weight[:, :, :, 0, 0].transpose(1, 2))
    if bias is not None:
        out = out + bias
    return out.view(*pixels.shape[:3], -1).permute(0, 3, 1, 2)


class NoiseInjection(nn.Module):
    """GPEN's skip connection: the encoder feature map ("noise" in StyleGAN2) scaled by one
    learned scalar and concatenated to the activations, doubling the channels."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))

    def forward(self, x: Tensor, feature: Tensor) -> Tensor:
        return torch.cat([x, self.weight.to(x.dtype) * feature.to(x.dtype)], dim=1)


class StyledConv(nn.Module):
    """Modulated conv -> concatenate the scaled encoder feature -> bias + leaky ReLU."""

    def __init__(self, in_ch: int, out_ch: int, style_dim: int, *, upsample: bool = False):
        super().__init__()
        self.conv = ModulatedConv2d(in_ch, out_ch, 3, style_dim, upsample=upsample)
        self.noise = NoiseInjection()
        self.activate = FusedLeakyReLU(2 * out_ch)

    def forward(self, x: Tensor, w: Tensor, feature: Tensor) -> Tensor:
        # activate(noise(conv(x), feature)), written straight into one channels-last buffer:
        # the conv half carries its bias and the gain, the skip half is gain * (n * f + b).
        bias = self.activate.bias.to(x.dtype)
        out_ch = bias.shape[0] // 2
        image = self.conv(x, w, bias[:out_ch], gain=ACTIVATION_GAIN)
        out = torch.empty((image.shape[0], 2 * out_ch, *image.shape[2:]), dtype=image.dtype, device=image.device,
                          memory_format=torch.channels_last)
        out[:, :out_ch] = image
        torch.addcmul(bias[out_ch:, None, None] * ACTIVATION_GAIN, self.noise.weight.to(x.dtype) * ACTIVATION_GAIN,
                      feature.to(x.dtype), out=out[:, out_ch:])
        return leaky_relu_(out)


class ToRGB(nn.Module):
    """1x1 modulated (not demodulated) conv to RGB, plus the upsampled previous RGB."""

    def __init__(self, in_ch: int, style_dim: int, *, upsample: bool = True):
        super().__init__()
        if upsample:
            self.upsample = Upsample()
        self.conv = ModulatedConv2d(in_ch, 3, 1, style_dim, demodulate=False)
        self.bias = nn.Parameter(torch.zeros(1, 3, 1, 1))

    def forward(self, x: Tensor, w: Tensor, skip: Tensor | None = None) -> Tensor:
        out = self.conv(x, w, self.bias.reshape(3))
        if skip is not None:
            out = out + self.upsample(skip)
        return out


class ConstantInput(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.input = nn.Parameter(torch.randn(1, channels, 4, 4))

    def forward(self, batch: int) -> Tensor:
        return self.input.expand(batch, -1, -1, -1).contiguous(memory_format=torch.channels_last)


class StyleGAN2Decoder(nn.Module):
    """The ``generator`` of the official layout: mapping network + synthesis network."""

    def __init__(self, cfg: GPENConfig):
        super().__init__()
        sd, ch = cfg.style_dim, cfg.channels
        self.style = nn.Sequential(
            PixelNorm(), *[EqualLinear(sd, sd, lr_mul=0.01, activate=True) for _ in range(cfg.n_mlp)]
        )
        self.input = ConstantInput(ch(4))
        self.conv1 = StyledConv(ch(4), ch(4), sd)
        self.to_rgb1 = ToRGB(2 * ch(4), sd, upsample=False)
        self.convs = nn.ModuleList()
        self.to_rgbs = nn.ModuleList()
        in_ch = ch(4)
        for log_res in range(3, cfg.log_size + 1):
            out_ch = ch(2**log_res)
            self.convs.append(StyledConv(2 * in_ch, out_ch, sd, upsample=True))
            self.convs.append(StyledConv(2 * out_ch, out_ch, sd))
            self.to_rgbs.append(ToRGB(2 * out_ch, sd))
            in_ch = out_ch

    def forward(self, code: Tensor, features: list[Tensor]) -> Tensor:
        """``features`` are the encoder maps from 4x4 up to full size."""
        w = self.style(code)  # one w for every layer (no style mixing, truncation 1)
        x = self.input(code.shape[0]).to(features[0].dtype)
        x = self.conv1(x, w, features[0])
        rgb = self.to_rgb1(x, w)
        for i, to_rgb in enumerate(self.to_rgbs):
            feature = features[i + 1]
            x = self.convs[2 * i](x, w, feature)
            x = self.convs[2 * i + 1](x, w, feature)
            rgb = to_rgb(x, w, rgb)
        return rgb


class FullGenerator(nn.Module):
    """GPEN: encoder -> latent code -> StyleGAN2 decoder fed with the encoder's features.

    Input: N x 3 x S x S RGB in [-1, 1]. Output: same shape, raw (not clamped), in the
    input's dtype.
    """

    def __init__(self, cfg: GPENConfig):
        super().__init__()
        self.config = cfg
        ch = cfg.channels
        self.ecd0 = nn.Sequential(EncoderInput(ch(cfg.size)))
        for j in range(1, cfg.log_size - 1):
            in_res = cfg.size >> (j - 1)
            setattr(self, f"ecd{j}", nn.Sequential(EncoderDown(ch(in_res), ch(in_res // 2))))
        self.final_linear = nn.Sequential(EqualLinear(ch(4) * 16, cfg.style_dim, activate=True))
        self.generator = StyleGAN2Decoder(cfg)

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.ecd0[0][0].weight.dtype

    def set_compute_dtype(self, dtype: torch.dtype) -> FullGenerator:
        """Convolutions in ``dtype``; the latent path (EqualLinear layers) stays float32."""
        self.to(dtype)
        for m in self.modules():
            if isinstance(m, EqualLinear):
                m.float()
        return self

    def encode(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        """The latent code and the encoder's feature maps, smallest (4x4) first."""
        features = []
        for j in range(self.config.log_size - 1):
            x = getattr(self, f"ecd{j}")(x)
            features.append(x)
        code = self.final_linear(x.reshape(x.shape[0], -1))  # NCHW flatten order, as trained
        return code, features[::-1]

    def forward(self, x: Tensor) -> Tensor:
        in_dtype = x.dtype
        # Channels-last activations throughout: oneDNN's (transposed) convolutions and
        # depthwise blurs are 2x faster on them, and cuDNN's half-precision kernels want them.
        x = x.to(self.compute_dtype).contiguous(memory_format=torch.channels_last)
        code, features = self.encode(x)
        return self.generator(code, features).to(in_dtype).contiguous()
