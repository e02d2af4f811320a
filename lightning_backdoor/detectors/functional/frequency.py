"""Frequency-domain trigger detection, in pure torch (no Lightning).

Zeng et al., "Rethinking the Backdoor Attacks' Triggers: A Frequency Perspective", ICCV 2021.
Triggers leave high-frequency artefacts in an image's spectrum. A small CNN is trained on the 2-D
DCT (type II, orthonormal, per channel) of benign images against the same images carrying triggers
the *defender* synthesises -- random patches, random blends and random additive noise -- never the
attacker's trigger (docs/methods.md §4). Model-free: the classifier under attack is not used.

    spectrum = dct2(x)                                      # [N, C, H, W], orthonormal DCT-II
    triggered = synthetic_triggers(x, generator)            # defender-made poisoned copies
    net, mean, std = train_frequency_classifier(x_benign, seed=0)
    score = frequency_score(net, x, mean, std)              # logit(triggered) - logit(clean)
"""

from __future__ import annotations

import functools
import math
from typing import Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...utils import preserved_rng

#: the synthetic trigger families, drawn with equal probability per image
TRIGGER_FAMILIES = ("patch", "blend", "noise")


@functools.lru_cache(maxsize=32)
def _dct_matrix_cpu(n: int) -> Tensor:
    k = torch.arange(n, dtype=torch.float64).view(-1, 1)
    i = torch.arange(n, dtype=torch.float64).view(1, -1)
    m = torch.cos(math.pi * (2 * i + 1) * k / (2 * n)) * math.sqrt(2.0 / n)
    m[0] /= math.sqrt(2.0)
    return m


def dct_matrix(n: int, device: torch.device | None = None, dtype: torch.dtype = torch.float32) -> Tensor:
    """The ``n x n`` orthonormal DCT-II matrix ``D`` (``D @ v`` is ``scipy.fft.dct(v, norm="ortho")``)."""
    return _dct_matrix_cpu(int(n)).to(device=device, dtype=dtype)


def dct2(x: Tensor) -> Tensor:
    """Orthonormal 2-D DCT-II over the last two dimensions (``scipy.fft.dctn(x, axes=(-2, -1), norm="ortho")``).

    Example:
        >>> y = dct2(torch.ones(1, 1, 4, 4))
        >>> round(float(y[0, 0, 0, 0]), 4), round(float(y.abs().sum() - y[0, 0, 0, 0]), 4)
        (4.0, 0.0)
    """
    h, w = x.shape[-2:]
    dh, dw = dct_matrix(h, x.device, x.dtype), dct_matrix(w, x.device, x.dtype)
    return dh @ x @ dw.T


def synthetic_triggers(x: Tensor, generator: torch.Generator) -> Tensor:
    """A defender-made triggered copy of every image (``x`` is untouched), one random family per image:

    - ``"patch"``: a square of side 2...max(2, min(H, W) // 4) at a random place, filled with random
      noise or one random colour;
    - ``"blend"``: ``(1 - a) x + a p`` with a random uniform-noise image ``p``, ``a`` in [0.05, 0.25];
    - ``"noise"``: ``clip(x + e u)``, ``u`` uniform in [-1, 1] per pixel, ``e`` in [4/255, 16/255].

    All draws come from ``generator`` (CPU); the result is on ``x``'s device.
    """
    n, c, h, w = x.shape
    out = x.detach().clone()
    fam = torch.randint(len(TRIGGER_FAMILIES), (n,), generator=generator).tolist()
    side_max = max(2, min(h, w) // 4)
    for i, f in enumerate(fam):
        name = TRIGGER_FAMILIES[f]
        if name == "patch":
            s = int(torch.randint(2, side_max + 1, (1,), generator=generator)) if side_max > 2 else 2
            s = min(s, h, w)
            top = int(torch.randint(h - s + 1, (1,), generator=generator))
            left = int(torch.randint(w - s + 1, (1,), generator=generator))
            if bool(torch.rand(1, generator=generator) < 0.5):
                patch = torch.rand(c, s, s, generator=generator)
            else:
                patch = torch.rand(c, 1, 1, generator=generator).expand(c, s, s)
            out[i, :, top:top + s, left:left + s] = patch.to(out.device, out.dtype)
        elif name == "blend":
            a = 0.05 + 0.2 * float(torch.rand(1, generator=generator))
            pattern = torch.rand(c, h, w, generator=generator).to(out.device, out.dtype)
            out[i] = (1 - a) * out[i] + a * pattern
        else:
            e = (4 + 12 * float(torch.rand(1, generator=generator))) / 255.0
            u = (torch.rand(c, h, w, generator=generator) * 2 - 1).to(out.device, out.dtype)
            out[i] = (out[i] + e * u).clamp(0, 1)
    return out


class FrequencyNet(nn.Module):
    """A small CNN on standardised DCT spectra: three conv-BN-ReLU blocks (the first two pooled), a 4x4
    adaptive pooling that keeps which frequency band a response sits in, dropout and 2 logits."""

    def __init__(self, in_channels: int, width: int = 8) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
            nn.MaxPool2d(2, ceil_mode=True),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(),
            nn.MaxPool2d(2, ceil_mode=True),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(),
            nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Dropout(0.3),
        )
        self.head = nn.Linear(2 * width * 16, 2)

    def forward(self, spectra: Tensor) -> Tensor:
        return self.head(self.features(spectra))


def spectra(x: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """Standardised DCT spectra ``(dct2(x) - mean) / std`` (per coefficient, from the training set)."""
    return (dct2(x) - mean) / std


def train_frequency_classifier(
    x_benign: Tensor, *, seed: int = 0, epochs: int = 10, lr: float = 3e-3, batch_size: int = 64, width: int = 8,
) -> Tuple[FrequencyNet, Tensor, Tensor]:
    """Train the clean-vs-triggered classifier on ``x_benign`` and fresh synthetic triggers of it each epoch.

    Seeded (initialisation, trigger draws, batch order and dropout all follow ``seed``) and run on
    ``x_benign``'s device; the caller's global RNG is untouched. Returns ``(net in eval mode, mean, std)``
    where ``mean``/``std`` (``[C, H, W]``) standardise the spectra.
    """
    device = x_benign.device
    gen = torch.Generator().manual_seed(int(seed))
    # a detection callback fits inside Lightning's test loop, i.e. under inference mode: train outside it
    with preserved_rng(device), torch.inference_mode(False), torch.enable_grad():
        x_benign = x_benign.clone()  # a normal tensor (one made under inference mode cannot enter autograd)
        torch.manual_seed(int(seed))
        net = FrequencyNet(x_benign.shape[1], width).to(device)
        first = torch.cat([x_benign, synthetic_triggers(x_benign, gen)])
        spec = dct2(first)
        mean, std = spec.mean(dim=0), spec.std(dim=0).clamp_min(1e-6)
        opt = torch.optim.Adam(net.parameters(), lr=lr)
        n = len(x_benign)
        labels = torch.cat([torch.zeros(n, dtype=torch.long), torch.ones(n, dtype=torch.long)]).to(device)
        net.train()
        for epoch in range(epochs):
            data = first if epoch == 0 else torch.cat([x_benign, synthetic_triggers(x_benign, gen)])
            feats = spectra(data, mean, std)
            order = torch.randperm(2 * n, generator=gen).to(device)
            for start in range(0, 2 * n, batch_size):
                idx = order[start:start + batch_size]
                if len(idx) < 2:  # BatchNorm needs two samples
                    continue
                loss = F.cross_entropy(net(feats[idx]), labels[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
    net.eval()
    return net, mean, std


def frequency_score(net: nn.Module, x: Tensor, mean: Tensor, std: Tensor, *, batch_size: int = 1024) -> Tensor:
    """``logit(triggered) - logit(clean)`` of the classifier on each input's spectrum (higher = poisoned)."""
    out = []
    with torch.no_grad():
        for start in range(0, len(x), batch_size):
            logits = net(spectra(x[start:start + batch_size], mean, std))
            out.append((logits[:, 1] - logits[:, 0]).float())
    return torch.cat(out) if out else torch.zeros(0, device=x.device)
