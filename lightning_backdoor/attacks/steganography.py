"""A small StegaStamp-style image-steganography encoder/decoder in pure torch (ISSBA's trigger generator).

The parameters are a plain ``dict`` of tensors (so an attack can keep them as buffers and a
checkpoint stays ``weights_only``-loadable):

- encoder: the code (as ±1) is spread by a linear layer over a ``GRID x GRID`` message map,
  upsampled to the image size; ``h = relu(conv3x3(relu(conv3x3([x, m]))))`` and
  ``x' = clip(x + r·tanh(conv1x1(h) + s·m))`` — so an encoder hides at most ``GRID²`` = 64 bits;
- decoder: two stride-2 3x3 convolutions, 4x4 average pooling and a linear layer to one logit
  per bit.

:func:`train_steganography` trains both on images with random codes (bit cross-entropy plus an
image MSE term), seeded by the generator it is given.
"""

from __future__ import annotations

import math
from typing import Dict, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor

ENCODER_KEYS = ("enc_msg", "enc_w1", "enc_b1", "enc_w2", "enc_b2", "enc_w3", "enc_b3", "enc_skip")
DECODER_KEYS = ("dec_w1", "dec_b1", "dec_w2", "dec_b2", "dec_lin", "dec_lin_b")
PARAM_KEYS = ENCODER_KEYS + DECODER_KEYS
#: side of the message grid the code is spread over; an encoder hides at most ``GRID * GRID`` bits
GRID = 8
_POOL = 4


def init_params(channels: int, code_bits: int, hidden: int, generator: torch.Generator) -> Dict[str, Tensor]:
    """He-initialised encoder/decoder parameters drawn from ``generator`` (on the CPU)."""

    def he(*shape: int, fan_in: int) -> Tensor:
        return torch.randn(shape, generator=generator) * math.sqrt(2.0 / fan_in)

    z = torch.zeros
    return {
        "enc_msg": he(code_bits, GRID * GRID, fan_in=code_bits),
        "enc_w1": he(hidden, channels + 1, 3, 3, fan_in=9 * (channels + 1)), "enc_b1": z(hidden),
        "enc_w2": he(hidden, hidden, 3, 3, fan_in=9 * hidden), "enc_b2": z(hidden),
        "enc_w3": he(channels, hidden, 1, 1, fan_in=hidden) * 0.1, "enc_b3": z(channels),
        "enc_skip": torch.ones(channels),
        "dec_w1": he(hidden, channels, 3, 3, fan_in=9 * channels), "dec_b1": z(hidden),
        "dec_w2": he(hidden, hidden, 3, 3, fan_in=9 * hidden), "dec_b2": z(hidden),
        "dec_lin": he(code_bits, hidden * _POOL * _POOL, fan_in=hidden * _POOL * _POOL), "dec_lin_b": z(code_bits),
    }


def encode(x: Tensor, code: Tensor, params: Dict[str, Tensor], max_residual: float) -> Tensor:
    """Hide ``code`` (``[B]`` or ``[N, B]`` of 0/1) in images ``x`` ``[N, C, H, W]``: ``clip(x + r·tanh(...))``.

    The code is spread over a ``GRID x GRID`` message map (a linear layer), upsampled to the image
    size and passed with the image through two 3x3 conv layers (plus a skip of the message map),
    so the residual depends on both the code and the image.

    Example:
        >>> p = init_params(1, 4, 8, torch.Generator().manual_seed(0))
        >>> x = torch.rand(2, 1, 8, 8)
        >>> xs = encode(x, torch.tensor([1., 0., 1., 1.]), p, 0.05)
        >>> xs.shape, bool((xs - x).abs().max() <= 0.05 + 1e-6)
        (torch.Size([2, 1, 8, 8]), True)
    """
    p = {k: v.to(device=x.device, dtype=x.dtype) for k, v in params.items() if k in ENCODER_KEYS}
    code = code.to(device=x.device, dtype=x.dtype)
    code = code.expand(len(x), -1) if code.dim() == 1 else code
    msg = ((2 * code - 1) @ p["enc_msg"]).reshape(len(x), 1, GRID, GRID)
    msg = F.interpolate(msg, size=tuple(x.shape[-2:]), mode="bilinear", align_corners=False)
    h = F.relu(F.conv2d(torch.cat([x, msg], 1), p["enc_w1"], p["enc_b1"], padding=1))
    h = F.relu(F.conv2d(h, p["enc_w2"], p["enc_b2"], padding=1))
    pre = F.conv2d(h, p["enc_w3"], p["enc_b3"]) + p["enc_skip"][None, :, None, None] * msg
    return (x + max_residual * torch.tanh(pre)).clamp(0, 1)


def decode(x: Tensor, params: Dict[str, Tensor]) -> Tensor:
    """Bit logits ``[N, B]`` recovered from images ``x`` (positive: bit 1)."""
    p = {k: v.to(device=x.device, dtype=x.dtype) for k, v in params.items() if k in DECODER_KEYS}
    h = F.relu(F.conv2d(x, p["dec_w1"], p["dec_b1"], stride=2, padding=1))
    h = F.relu(F.conv2d(h, p["dec_w2"], p["dec_b2"], stride=2, padding=1))
    return torch.flatten(F.adaptive_avg_pool2d(h, _POOL), 1) @ p["dec_lin"].t() + p["dec_lin_b"]


def train_steganography(params: Dict[str, Tensor], images: Tensor, epochs: int, max_residual: float,
                        batch_size: int = 64, lr: float = 5e-3, image_weight: float = 10.0,
                        generator: torch.Generator | None = None, device: torch.device | str = "cpu"
                        ) -> Dict[str, Tensor]:
    """Train encoder and decoder jointly: ``BCE(decode(encode(x, c)), c) + image_weight·MSE(encode(x, c), x)``.

    Random codes per batch (drawn from ``generator``), Adam, ``epochs`` passes in a seeded order on
    ``device``. Returns the trained parameters on the CPU.
    """
    params = {k: v.detach().to(device).clone().requires_grad_(True) for k, v in params.items()}
    bits = params["dec_lin"].shape[0]
    opt = torch.optim.Adam(list(params.values()), lr=lr)
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    total = epochs * math.ceil(len(images) / batch_size)
    step = 0
    for _ in range(epochs):
        for idx in _order(len(images), batch_size, g):
            ramp = min(1.0, step / max(1, total // 2))  # image term ramps up over the first half: bits first
            step += 1
            xb = images[idx].to(device)
            code = torch.randint(0, 2, (len(xb), bits), generator=g).float().to(device)
            xs = encode(xb, code, params, max_residual)
            loss = F.binary_cross_entropy_with_logits(decode(xs, params), code) + ramp * image_weight * F.mse_loss(xs, xb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return {k: v.detach().cpu() for k, v in params.items()}


def bit_accuracy(images: Tensor, code: Tensor, params: Dict[str, Tensor], max_residual: float) -> float:
    """Share of the code's bits the decoder recovers from the encoded ``images``."""
    with torch.no_grad():
        logits = decode(encode(images, code, params, max_residual), params)
    return float(((logits > 0).float() == code.to(logits).expand_as(logits)).float().mean())


def _order(n: int, batch_size: int, generator: torch.Generator) -> Iterable[Tensor]:
    perm = torch.randperm(n, generator=generator)
    for s in range(0, n, batch_size):
        yield perm[s:s + batch_size]
