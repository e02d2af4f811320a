"""TeCo: corruption-robustness consistency, in pure torch + the ``imagecorruptions`` library (no Lightning).

Liu et al., "Detecting Backdoors During the Inference Stage Based on Corruption Robustness
Consistency", CVPR 2023. Label-only. For each of the 15 corruption types of the common-corruption
benchmark (Hendrycks & Dietterich, ICLR 2019) and severity 1...5, TeCo records the first severity at
which the prediction of the corrupted copy differs from the prediction on the input (6 if it never
does); benign images flip at similar severities under every corruption, triggered images survive some
corruptions far longer than others. Score = the (population) standard deviation of those first-flip
severities across the corruption types (docs/methods.md §4).

Corruptions come from the ``imagecorruptions`` package (the maintained ``imagecorruptions-imaug``
release: ``pip install imagecorruptions-imaug``), applied per image on the CPU
(:func:`reference_corrupt`). :data:`TORCH_CORRUPTIONS` re-implements nine of the fifteen as batched
torch functions on the input's device (:func:`torch_corrupt`); they are tested against the library
(tests/detectors/test_teco.py): exactly for the deterministic ones (contrast, brightness, defocus blur,
zoom blur) and, given the same random draws, for frost (frost image and crop) and glass blur (pixel
offsets); in distribution for the noises (Gaussian, shot, impulse). ``backend="torch"`` uses them and
the library for the other six (motion blur, snow, fog, elastic, pixelate, JPEG); on a CPU, defocus and
glass blur stay with the library too (:data:`LIBRARY_ON_CPU`: faster there).

Images are handled as the library does: quantised to 8 bits, a 1-channel image replicated to RGB
(as ``imagecorruptions.corrupt`` does), corrupted, and its first channel kept (so per-channel noise
keeps its strength), the result truncated to 8 bits. The library's size check (>= 32 pixels) is not
applied: its corruption functions work on 28x28 digits too.
"""

from __future__ import annotations

import functools
import math
from typing import Callable, Dict, List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .consistency import variant_labels

#: The 15 corruption types of the common-corruption benchmark, in its order.
TECO_CORRUPTIONS: Tuple[str, ...] = (
    "gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur", "motion_blur", "zoom_blur",
    "snow", "frost", "fog", "brightness", "contrast", "elastic_transform", "pixelate", "jpeg_compression",
)
SEVERITIES: Tuple[int, ...] = (1, 2, 3, 4, 5)
#: First-flip value of a corruption that never changes the prediction.
NEVER = 6
TECO_BACKENDS = ("torch", "reference")
INSTALL_HINT = "pip install imagecorruptions-imaug  (or: pip install 'lightning-backdoor[teco]')"


def check_corruptions(corruptions: object) -> Tuple[str, ...]:
    """A non-empty sequence of distinct names from :data:`TECO_CORRUPTIONS`."""
    if isinstance(corruptions, str) or not hasattr(corruptions, "__iter__"):
        raise TypeError(f"corruptions must be a sequence of names from {list(TECO_CORRUPTIONS)}, got {corruptions!r}")
    names = tuple(corruptions)  # type: ignore[arg-type]
    if not names:
        raise ValueError(f"corruptions must name at least one of {list(TECO_CORRUPTIONS)}")
    for c in names:
        if c not in TECO_CORRUPTIONS:
            raise ValueError(f"unknown corruption {c!r}; known corruptions: {', '.join(TECO_CORRUPTIONS)}")
    if len(set(names)) != len(names):
        raise ValueError(f"corruptions must be distinct, got {list(names)}")
    return names


def check_severities(severities: object) -> Tuple[int, ...]:
    """A non-empty, strictly increasing sequence of ints in 1...5."""
    if isinstance(severities, (str, bytes)) or not hasattr(severities, "__iter__"):
        raise TypeError(f"severities must be a sequence of ints in 1...5, e.g. (1, 2, 3, 4, 5), got {severities!r}")
    values = list(severities)  # type: ignore[call-overload]
    if not values:
        raise ValueError("severities must hold at least one severity in 1...5")
    for s in values:
        if isinstance(s, bool) or not isinstance(s, int):
            raise TypeError(f"severities must be ints in 1...5, got {s!r} in {list(values)}")
        if not 1 <= s <= 5:
            raise ValueError(f"severities must be in 1...5 (the benchmark's levels), got {s} in {list(values)}")
    if any(b <= a for a, b in zip(values, values[1:])):
        raise ValueError(f"severities must be strictly increasing, got {list(values)}")
    return tuple(int(s) for s in values)


def _library():
    try:
        import imagecorruptions  # noqa: F401
        from imagecorruptions import corruption_dict
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(f"TeCo needs the imagecorruptions package for its corruptions: {INSTALL_HINT}") from err
    return corruption_dict


def corruption_seed(base_seed: int, corruption: str, severity: int) -> int:
    """The 32-bit seed of one corrupted copy of an input: a function of the input's base seed, the
    corruption and the severity only."""
    k = TECO_CORRUPTIONS.index(corruption)
    return (int(base_seed) * 1_000_003 + k * 31 + int(severity)) % (2 ** 32)


def _to_uint8_rgb(img: Tensor):
    import numpy as np

    arr = (img.detach().float().cpu().clamp(0, 1) * 255.0).round().to(torch.uint8).permute(1, 2, 0).numpy()
    if arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    return np.ascontiguousarray(arr)


def reference_corrupt(x: Tensor, corruption: str, severity: int, seeds: Sequence[int]) -> Tensor:
    """Corrupt each image with the ``imagecorruptions`` library (CPU, one image at a time).

    Args:
        x: images ``[N, C, H, W]`` in ``[0, 1]``, ``C`` in {1, 3}.
        corruption, severity: the corruption type and level (1...5).
        seeds: one 32-bit seed per image; numpy's global RNG (which the library draws from) is seeded
            with it for that image and restored afterwards, so the caller's numpy stream is untouched.

    Returns:
        new ``[N, C, H, W]`` float tensor on ``x``'s device, values multiples of 1/255.
    """
    import numpy as np
    from PIL import Image

    if x.shape[1] not in (1, 3):
        raise ValueError(f"TeCo's corruptions need 1- or 3-channel images, got {x.shape[1]} channels")
    fn = _library()[corruption]
    out = []
    state = np.random.get_state()
    try:
        for img, s in zip(x, seeds):
            np.random.seed(int(s) % (2 ** 32))
            kwargs = {"seed": int(s)} if corruption in ("glass_blur", "impulse_noise") else {}
            res = np.uint8(fn(Image.fromarray(_to_uint8_rgb(img)), severity, **kwargs))
            if res.ndim == 2:
                res = res[:, :, None]
            t = torch.from_numpy(np.array(res, dtype=np.uint8, copy=True)).permute(2, 0, 1).float().div_(255.0)
            out.append(t[: x.shape[1]] if x.shape[1] == 1 else t)
    finally:
        np.random.set_state(state)
    return torch.stack(out).to(x.device) if out else x.new_zeros((0,) + tuple(x.shape[1:]))


# -- batched torch re-implementations --------------------------------------------------------------
# Severity constants are the common-corruption benchmark's (as in the imagecorruptions package).
_GAUSSIAN = (0.08, 0.12, 0.18, 0.26, 0.38)
_SHOT = (60.0, 25.0, 12.0, 5.0, 3.0)
_IMPULSE = (0.03, 0.06, 0.09, 0.17, 0.27)
_CONTRAST = (0.4, 0.3, 0.2, 0.1, 0.05)
_BRIGHTNESS = (0.1, 0.2, 0.3, 0.4, 0.5)
_DEFOCUS = ((3, 0.1), (4, 0.5), (6, 0.5), (8, 0.5), (10, 0.5))
_ZOOM = ((1.0, 1.11, 0.01), (1.0, 1.16, 0.01), (1.0, 1.21, 0.02), (1.0, 1.26, 0.02), (1.0, 1.31, 0.03))
_FROST = ((1.0, 0.4), (0.8, 0.6), (0.7, 0.7), (0.65, 0.7), (0.6, 0.75))
_FROST_FILES = ("frost1.png", "frost2.png", "frost3.png", "frost4.jpg", "frost5.jpg", "frost6.jpg")


def _quantise(x: Tensor) -> Tensor:
    return torch.round(x.clamp(0, 1) * 255.0) / 255.0


def _truncate(v255: Tensor) -> Tensor:
    """``np.uint8`` of a float array in [0, 255] (truncation), back to [0, 1]."""
    return torch.floor(v255.clamp(0, 255)) / 255.0


def _generators(seeds: Sequence[int]) -> List[torch.Generator]:
    return [torch.Generator().manual_seed(int(s)) for s in seeds]


def _per_sample(shape: Tuple[int, ...], seeds: Sequence[int], draw: Callable[[Tuple[int, ...], torch.Generator], Tensor],
                device: torch.device) -> Tensor:
    return torch.stack([draw(shape, g) for g in _generators(seeds)]).to(device)


def _gaussian_noise(x: Tensor, severity: int, seeds: Sequence[int]) -> Tensor:
    noise = _per_sample(tuple(x.shape[1:]), seeds, lambda s, g: torch.randn(s, generator=g), x.device)
    return _truncate((x + noise.to(x.dtype) * _GAUSSIAN[severity - 1]).clamp(0, 1) * 255.0)


def _shot_noise(x: Tensor, severity: int, seeds: Sequence[int]) -> Tensor:
    c = _SHOT[severity - 1]
    rates = (x * c).cpu().float()
    counts = torch.stack([torch.poisson(r, generator=g) for r, g in zip(rates, _generators(seeds))]).to(x.device)
    return _truncate((counts.to(x.dtype) / c).clamp(0, 1) * 255.0)


def _impulse_noise(x: Tensor, severity: int, seeds: Sequence[int]) -> Tensor:
    u = _per_sample((2,) + tuple(x.shape[1:]), seeds, lambda s, g: torch.rand(s, generator=g), x.device).to(x.dtype)
    flipped, salted = u[:, 0] < _IMPULSE[severity - 1], u[:, 1] < 0.5
    out = torch.where(flipped & salted, torch.ones_like(x), x)
    out = torch.where(flipped & ~salted, torch.zeros_like(x), out)
    return _truncate(out * 255.0)


def _contrast(x: Tensor, severity: int, seeds: Sequence[int]) -> Tensor:
    mean = x.mean(dim=(2, 3), keepdim=True)
    return _truncate(((x - mean) * _CONTRAST[severity - 1] + mean).clamp(0, 1) * 255.0)


def _rgb_to_hsv(x: Tensor) -> Tensor:
    """Standard RGB -> HSV on ``[N, 3, H, W]`` (hue in [0, 1); ties of the max channel resolved blue > green > red)."""
    r, g, b = x[:, 0], x[:, 1], x[:, 2]
    v = x.amax(dim=1)
    delta = v - x.amin(dim=1)
    s = torch.where(v > 0, delta / torch.where(v > 0, v, torch.ones_like(v)), torch.zeros_like(v))
    safe = torch.where(delta > 0, delta, torch.ones_like(delta))
    h = (g - b) / safe
    h = torch.where(g == v, 2.0 + (b - r) / safe, h)
    h = torch.where(b == v, 4.0 + (r - g) / safe, h)
    h = torch.where(delta > 0, torch.remainder(h / 6.0, 1.0), torch.zeros_like(h))
    return torch.stack([h, s, v], dim=1)


def _hsv_to_rgb(hsv: Tensor) -> Tensor:
    """Standard HSV -> RGB (sector ``floor(6 h)``), the inverse of :func:`_rgb_to_hsv`."""
    h, s, v = hsv[:, 0], hsv[:, 1], hsv[:, 2]
    hi = torch.floor(h * 6.0)
    f = h * 6.0 - hi
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    sector = torch.remainder(hi, 6).long()
    table = torch.stack([torch.stack(c, dim=1) for c in
                         ((v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q))])  # [6, N, 3, H, W]
    return table.gather(0, sector.unsqueeze(0).unsqueeze(2).expand(1, -1, 3, -1, -1)).squeeze(0)


def _brightness(x: Tensor, severity: int, seeds: Sequence[int]) -> Tensor:
    # HSV value + c (hue and saturation kept); a 1-channel image is its own value channel
    c = _BRIGHTNESS[severity - 1]
    if x.shape[1] == 1:
        return _truncate((x + c).clamp(0, 1) * 255.0)
    hsv = _rgb_to_hsv(x)
    hsv = torch.cat([hsv[:, :2], (hsv[:, 2:] + c).clamp(0, 1)], dim=1)
    return _truncate(_hsv_to_rgb(hsv).clamp(0, 1) * 255.0)


@functools.lru_cache(maxsize=16)
def _disk_kernel(radius: int, alias_blur: float) -> Tensor:
    from imagecorruptions.corruptions import disk  # the library's own kernel

    return torch.from_numpy(disk(radius=radius, alias_blur=alias_blur)).float()


def _defocus_blur(x: Tensor, severity: int, seeds: Sequence[int]) -> Tensor:
    radius, alias = _DEFOCUS[severity - 1]
    kernel = _disk_kernel(radius, alias).to(device=x.device, dtype=x.dtype)
    pad = kernel.shape[-1] // 2
    if min(x.shape[-2:]) <= pad:  # reflect padding needs a larger image: use the library
        return reference_corrupt(x, "defocus_blur", severity, seeds)
    c = x.shape[1]
    padded = F.pad(x, (pad, pad, pad, pad), mode="reflect")  # OpenCV's default border (reflect-101)
    out = F.conv2d(padded, kernel.expand(c, 1, *kernel.shape), groups=c)
    return _truncate(out.clamp(0, 1) * 255.0)


def _linear_zoom_matrix(length: int, out_length: int, device: torch.device) -> Tensor:
    """``[out_length, length]`` weights of order-1 spline zoom (``scipy.ndimage.zoom``, ``grid_mode=False``)."""
    if out_length == 1 or length == 1:
        pos = torch.zeros(out_length, dtype=torch.float64)
    else:
        pos = torch.arange(out_length, dtype=torch.float64) * ((length - 1) / (out_length - 1))
    lo = pos.floor().clamp(max=length - 1).long()
    frac = pos - lo
    hi = (lo + 1).clamp(max=length - 1)
    m = torch.zeros(out_length, length, dtype=torch.float64)
    m[torch.arange(out_length), lo] += 1 - frac
    m[torch.arange(out_length), hi] += frac
    return m.to(device)


def _clipped_zoom(x: Tensor, z: float) -> Tensor:
    h, w = x.shape[-2:]
    ch, cw = int(math.ceil(h / z)), int(math.ceil(w / z))
    top, left = (h - ch) // 2, (w - cw) // 2
    crop = x[..., top:top + ch, left:left + cw].double()  # scipy interpolates in float64
    oh, ow = int(round(ch * z)), int(round(cw * z))
    my, mx = _linear_zoom_matrix(ch, oh, x.device), _linear_zoom_matrix(cw, ow, x.device)
    zoomed = torch.einsum("ij,ncjk,lk->ncil", my, crop, mx).to(x.dtype)
    out = x.new_zeros(x.shape)
    out[..., : min(oh, h), : min(ow, w)] = zoomed[..., :h, :w]
    return out


def _zoom_blur(x: Tensor, severity: int, seeds: Sequence[int]) -> Tensor:
    import numpy as np

    start, stop, step = _ZOOM[severity - 1]
    factors = np.arange(start, stop, step)  # the benchmark's zoom factors, spaced exactly as numpy spaces them
    x32 = x.float()  # the library blurs in float32 (each zoomed layer interpolated in float64, stored as float32)
    acc = torch.zeros_like(x32)
    for z in factors.tolist():
        acc += _clipped_zoom(x, z).float()
    out = ((x32 + acc) / (len(factors) + 1)).clamp(0, 1) * 255.0
    return torch.floor(out).to(x.dtype) / 255.0


_GLASS = ((0.7, 1, 2), (0.9, 2, 1), (1.0, 2, 3), (1.1, 3, 2), (1.5, 4, 2))  # sigma, max_delta, iterations


def _gaussian_nearest(x: Tensor, sigma: float) -> Tensor:
    """Separable Gaussian filter with edge replication, radius ``int(4 sigma + 0.5)`` (``scipy.ndimage.gaussian_filter``
    with ``mode="nearest"``, which ``skimage.filters.gaussian`` uses), per channel."""
    radius = int(4.0 * sigma + 0.5)
    k = torch.arange(-radius, radius + 1, dtype=torch.float64, device=x.device)
    w = torch.exp(-0.5 * (k / sigma) ** 2)
    w = (w / w.sum()).to(x.dtype)
    c = x.shape[1]
    out = F.conv2d(F.pad(x, (0, 0, radius, radius), mode="replicate"), w.view(1, 1, -1, 1).expand(c, 1, -1, 1),
                   groups=c)
    return F.conv2d(F.pad(out, (radius, radius, 0, 0), mode="replicate"), w.view(1, 1, 1, -1).expand(c, 1, 1, -1),
                    groups=c)


def glass_positions(h: int, w: int, severity: int) -> List[Tuple[int, int]]:
    """The pixels glass blur visits, in its order (bottom-right to top-left, ``iterations`` times)."""
    _, delta, iterations = _GLASS[severity - 1]
    return [(r, c) for _ in range(iterations) for r in range(h - delta, delta, -1) for c in range(w - delta, delta, -1)]


def glass_with(x: Tensor, severity: int, offsets: Tensor) -> Tensor:
    """Glass blur with given per-image ``offsets[i, step] = (dx, dy)`` (each in ``[-max_delta, max_delta)``):
    blur, move pixel ``(h + dy, w + dx)`` onto ``(h, w)`` at each visited position, blur again.

    (The library "swaps" the two pixels with a tuple assignment of array views, which copies the
    second onto the first and leaves the second as it is; that is what is reproduced.) The steps run
    in order, each on the whole batch at once.
    """
    sigma, _, _ = _GLASS[severity - 1]
    h, w = x.shape[-2:]
    positions = glass_positions(h, w, severity)
    if offsets.shape != (len(x), len(positions), 2):
        raise ValueError(f"offsets must have shape [{len(x)}, {len(positions)}, 2], got {tuple(offsets.shape)}")
    y = torch.floor(_gaussian_nearest(x, sigma).clamp(0, 1) * 255.0)  # np.uint8 of the first blur
    rows = torch.arange(len(x), device=x.device)
    offs = offsets.to(x.device).long()
    for step, (r, c) in enumerate(positions):
        y[rows, :, r, c] = y[rows, :, r + offs[:, step, 1], c + offs[:, step, 0]]
    return _truncate(_gaussian_nearest(y / 255.0, sigma).clamp(0, 1) * 255.0)


def glass_offsets(h: int, w: int, severity: int, seeds: Sequence[int]) -> Tensor:
    """``[N, steps, 2]`` offsets ``(dx, dy)`` drawn from each image's seed."""
    _, delta, _ = _GLASS[severity - 1]
    steps = len(glass_positions(h, w, severity))
    return torch.stack([torch.randint(-delta, delta, (steps, 2), generator=g) for g in _generators(seeds)])


def _glass_blur(x: Tensor, severity: int, seeds: Sequence[int]) -> Tensor:
    return glass_with(x, severity, glass_offsets(x.shape[-2], x.shape[-1], severity, seeds))


@functools.lru_cache(maxsize=6)
def _frost_image(idx: int):
    """The library's ``idx``-th frost image, rescaled by 1.1 as the library does (HWC, RGB, 0-255 float)."""
    import importlib.resources

    import cv2

    ref = importlib.resources.files("imagecorruptions") / "frost" / _FROST_FILES[idx]
    with importlib.resources.as_file(ref) as path:
        frost = cv2.imread(str(path))
    return frost  # BGR uint8 (numpy), resized per image size in _frost_rescaled


@functools.lru_cache(maxsize=24)
def _frost_rescaled(idx: int, h: int, w: int) -> Tensor:
    import cv2
    import numpy as np

    frost = _frost_image(idx)
    fh, fw = frost.shape[:2]
    factor = 1.0
    if fh < h and fw >= w:
        factor = h / fh
    elif fh >= h and fw < w:
        factor = w / fw
    elif fh < h and fw < w:
        factor = max(h / fh, w / fw)
    factor *= 1.1
    resized = cv2.resize(frost, dsize=(int(np.ceil(fw * factor)), int(np.ceil(fh * factor))), interpolation=cv2.INTER_CUBIC)
    return torch.from_numpy(np.ascontiguousarray(resized[..., [2, 1, 0]])).permute(2, 0, 1).float()  # RGB, CHW


def frost_crops(h: int, w: int, seeds: Sequence[int]) -> Tensor:
    """``[N, 3]`` (frost image index, top, left) per image, drawn from each image's seed."""
    rows = []
    for g in _generators(seeds):
        idx = int(torch.randint(6, (1,), generator=g))
        fr = _frost_rescaled(idx, h, w)
        top = int(torch.randint(fr.shape[1] - h, (1,), generator=g))
        left = int(torch.randint(fr.shape[2] - w, (1,), generator=g))
        rows.append((idx, top, left))
    return torch.tensor(rows, dtype=torch.long).view(-1, 3)


def frost_with(x: Tensor, severity: int, crops: Tensor) -> Tensor:
    """Frost with given ``(image index, top, left)`` crops: ``clip(a * x + b * frost_crop)`` (8-bit scale)."""
    a, b = _FROST[severity - 1]
    h, w = x.shape[-2:]
    layers = []
    for idx, top, left in crops.tolist():
        layer = _frost_rescaled(int(idx), h, w)[:, top:top + h, left:left + w]
        layers.append(layer[: x.shape[1]] if x.shape[1] == 1 else layer)
    frost = torch.stack(layers).to(device=x.device, dtype=x.dtype)
    return _truncate((a * torch.round(x * 255.0) + b * frost).clamp(0, 255))


def _frost(x: Tensor, severity: int, seeds: Sequence[int]) -> Tensor:
    return frost_with(x, severity, frost_crops(x.shape[-2], x.shape[-1], seeds))


#: Corruptions re-implemented as batched torch functions ``fn(x_quantised, severity, seeds) -> Tensor``.
TORCH_CORRUPTIONS: Dict[str, Callable[[Tensor, int, Sequence[int]], Tensor]] = {
    "gaussian_noise": _gaussian_noise,
    "shot_noise": _shot_noise,
    "impulse_noise": _impulse_noise,
    "defocus_blur": _defocus_blur,
    "glass_blur": _glass_blur,
    "zoom_blur": _zoom_blur,
    "frost": _frost,
    "brightness": _brightness,
    "contrast": _contrast,
}


#: Re-implemented corruptions that stay with the library on a CPU, where it is faster: float64
#: convolutions with 17x17-21x21 kernels and glass blur's ~1,000 sequential pixel moves run slower as
#: torch ops on a CPU than in OpenCV / numba (benchmarks/bench_detectors.py); on a GPU they run batched.
LIBRARY_ON_CPU = frozenset({"defocus_blur", "glass_blur"})


def torch_corrupt(x: Tensor, corruption: str, severity: int, seeds: Sequence[int], *,
                  library_on_cpu: bool = True) -> Tensor:
    """Corrupt a batch on its device with the torch re-implementation when there is one, else with the library.

    The input is quantised to 8 bits first, as for the library, and the work is done in float64 as the
    library does it. With ``library_on_cpu`` the corruptions in :data:`LIBRARY_ON_CPU` use the library
    for CPU tensors. Returns a new tensor.
    """
    if x.shape[1] not in (1, 3):
        raise ValueError(f"TeCo's corruptions need 1- or 3-channel images, got {x.shape[1]} channels")
    fn = TORCH_CORRUPTIONS.get(corruption)
    if (fn is None or x.device.type == "mps"  # (no float64 on MPS)
            or (library_on_cpu and x.device.type == "cpu" and corruption in LIBRARY_ON_CPU)):
        return reference_corrupt(x, corruption, severity, seeds)
    return fn(_quantise(x.double()), severity, seeds).to(x.dtype)


def first_flip_severity(pred: Tensor, labels: Tensor, severities: Sequence[int] = SEVERITIES) -> Tensor:
    """Per corruption type and input, the first severity whose label differs from ``pred`` (``NEVER`` = 6 if none).

    Args:
        pred: ``[N]`` labels of the inputs.
        labels: ``[T, S, N]`` labels of the corrupted copies (type, severity in increasing order, input).

    Returns:
        float ``[T, N]`` of severities.
    """
    sev = torch.tensor(list(severities), dtype=torch.float32, device=labels.device)
    changed = labels != pred.view(1, 1, -1)
    # severity of the first change: the minimum over the changed severities, NEVER where none changed
    values = torch.where(changed, sev.view(1, -1, 1), torch.full_like(sev.view(1, -1, 1), float(NEVER)))
    return values.amin(dim=1)


def teco_deviation(flips: Tensor) -> Tensor:
    """TeCo score: population standard deviation of the first-flip severities over corruption types (dim 0)."""
    return flips.std(dim=0, correction=0)


def teco_score(
    model: nn.Module,
    x: Tensor,
    seeds: Sequence[int],
    corruptions: Sequence[str] = TECO_CORRUPTIONS,
    severities: Sequence[int] = SEVERITIES,
    *,
    backend: str = "torch",
    batch_size: int | None = None,
    return_flips: bool = False,
):
    """TeCo score of each input (``Tensor[N]``, higher = more likely poisoned).

    Args:
        model: classifier returning logits for pixel-space input.
        x: images ``[N, C, H, W]`` in ``[0, 1]`` (``C`` in {1, 3}); never modified.
        seeds: one base seed per input; each corrupted copy's randomness comes from
            :func:`corruption_seed` of it (so an input's score does not depend on its batch).
        corruptions: corruption types (default: all 15).
        severities: severities tried (default 1...5).
        backend: ``"torch"`` (batched torch re-implementations where available) or ``"reference"``
            (the library for every corruption).
        batch_size: None (forwards the size of ``x``, one per copy) or the maximum images per forward.
        return_flips: also return the ``[T, N]`` first-flip severities.

    Cost: ``1 + T * S`` forward passes per input (76 with the defaults) plus the corruptions.

    Example:
        >>> net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 3))
        >>> teco_score(net, torch.rand(2, 3, 32, 32), [0, 1], ("contrast", "brightness"), (1, 3)).shape
        torch.Size([2])
    """
    corruptions = check_corruptions(corruptions)
    severities = check_severities(severities)
    if backend not in TECO_BACKENDS:
        raise ValueError(f"backend must be one of {list(TECO_BACKENDS)}, got {backend!r}")
    seeds = [int(s) for s in seeds]
    if len(seeds) != len(x):
        raise ValueError(f"seeds must hold one seed per input ({len(x)}), got {len(seeds)}")
    corrupt = torch_corrupt if backend == "torch" else reference_corrupt
    plan = [(c, s) for c in corruptions for s in severities]
    num = len(plan)

    def make(xc: Tensor, v: int) -> Tensor:
        c, s = plan[v]
        return corrupt(xc, c, s, [corruption_seed(b, c, s) for b in seeds])

    pred, labels = variant_labels(model, x, make, num, batch_size=batch_size)
    flips = first_flip_severity(pred, labels.view(len(corruptions), len(severities), len(x)), severities)
    score = teco_deviation(flips)
    return (score, flips) if return_flips else score
