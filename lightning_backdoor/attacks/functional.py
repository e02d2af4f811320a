"""Pure-torch trigger functions: the functional core of ``lightning_backdoor.attacks``.

Every function here is batched (``[N, C, H, W]`` images in pixel space ``[0, 1]``), follows the
input's device and dtype, never imports Lightning and never consumes the global random number
generator unless the caller asks it to (``generator=None`` where a ``generator`` is accepted).
The ``Attack`` classes hold settings and trigger state and call these functions.

Formulas:

- patch stamping (BadNets, Gu et al. 2017): ``x' = (1 - m) * x + m * p``
- blending (Blended, Chen et al. 2017): ``x' = (1 - alpha) * x + alpha * p``
- warping (WaNet, Nguyen & Tran, ICLR 2021): ``x' = grid_sample(x, identity + s * upsample(noise_k))``
- affine transforms (BATT's rotation, PhysicalBA's shrink/rotate/flip): ``x'(p) = x(A^-1 (p - t))``
  about the image centre, bilinear, zero fill (torchvision's ``rotate``/``affine`` convention)
- colour jitter (PhysicalBA): ``x' = clamp((clamp(b x) - m) c + m)``, ``m`` the grey mean
- piece masks (Adap-Blend/Adap-Patch): a ``rows x cols`` grid of cells, a random subset kept per sample

Example:
    >>> import torch
    >>> from lightning_backdoor.attacks import functional as AF
    >>> x = torch.rand(2, 3, 32, 32)
    >>> patch = torch.ones(3, 3, 3)
    >>> AF.stamp_patch(x, patch, location="bottom_right")[:, :, -3:, -3:].min().item()
    1.0
    >>> grid = AF.wanet_grid(AF.wanet_noise(4, generator=AF.seeded_generator(0)), 32, 32, s=0.5)
    >>> AF.warp(x, grid).shape
    torch.Size([2, 3, 32, 32])
"""

from __future__ import annotations

import math
from typing import Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from ..validation import check_seed, check_size2

__all__ = [
    "LOCATIONS",
    "seeded_generator",
    "seeded_rand",
    "resolve_location",
    "stamp_patch",
    "blend",
    "resize_pattern",
    "wanet_noise",
    "wanet_grid",
    "wanet_noise_grid",
    "warp",
    "affine",
    "rotate",
    "translate",
    "adjust_brightness_contrast",
    "random_subsets",
    "grid_cells",
    "piece_mask",
]

#: Named patch locations accepted by :func:`resolve_location`.
LOCATIONS = ("bottom_right", "top_left", "top_right", "bottom_left")

Location = Union[str, Sequence[int]]


# -- randomness ----------------------------------------------------------------------------------
def seeded_generator(seed: int) -> torch.Generator:
    """A fresh CPU ``torch.Generator`` seeded with ``seed`` (the global RNG is left untouched).

    Trigger state is always drawn on the CPU so that the same seed gives the same trigger on
    every device; move it afterwards.
    """
    check_seed(seed)
    return torch.Generator(device="cpu").manual_seed(seed)


def seeded_rand(shape: Sequence[int], seed: int) -> Tensor:
    """Uniform ``[0, 1)`` float32 noise of ``shape`` drawn on the CPU from a local generator seeded with ``seed``."""
    return torch.rand(tuple(shape), generator=seeded_generator(seed), dtype=torch.float32)


def _rand_like_on(shape: Tuple[int, ...], like: Tensor, generator: torch.Generator | None) -> Tensor:
    """Uniform noise drawn on the generator's device (or ``like``'s when ``generator`` is None), moved to ``like``."""
    device = generator.device if generator is not None else like.device
    return torch.rand(shape, generator=generator, device=device, dtype=torch.float32).to(like)


# -- patches -------------------------------------------------------------------------------------
def resolve_location(
    location: Location, patch_size: int | Sequence[int], image_size: int | Sequence[int]
) -> Tuple[int, int]:
    """The ``(row, col)`` of a patch's top-left corner inside an image.

    Args:
        location: one of ``"bottom_right"``, ``"top_left"``, ``"top_right"``, ``"bottom_left"``,
            or an explicit ``(row, col)`` pair of non-negative ints.
        patch_size: ``p`` or ``(p, q)``, the patch height and width.
        image_size: ``H`` or ``(H, W)``.

    Raises:
        ValueError: if the patch does not fit into the image at that location.

    Example:
        >>> resolve_location("bottom_right", 3, (32, 28))
        (29, 25)
    """
    p, q = check_size2(patch_size, "patch_size")
    h, w = check_size2(image_size, "image_size")
    if p > h or q > w:
        raise ValueError(f"patch_size {(p, q)} is larger than the image size {(h, w)} (H, W)")
    if isinstance(location, str):
        corners = {
            "top_left": (0, 0),
            "top_right": (0, w - q),
            "bottom_left": (h - p, 0),
            "bottom_right": (h - p, w - q),
        }
        if location not in corners:
            raise ValueError(f"location must be one of {list(LOCATIONS)} or a (row, col) pair, got {location!r}")
        return corners[location]
    if (
        not isinstance(location, (tuple, list))
        or len(location) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) for v in location)
    ):
        raise TypeError(f"location must be one of {list(LOCATIONS)} or a (row, col) pair of ints, got {location!r}")
    row, col = int(location[0]), int(location[1])
    if not (0 <= row <= h - p and 0 <= col <= w - q):
        raise ValueError(
            f"location {(row, col)} puts a {p}x{q} patch outside a {h}x{w} image; "
            f"row must be in [0, {h - p}] and col in [0, {w - q}]"
        )
    return row, col


def stamp_patch(
    x: Tensor, patch: Tensor, mask: Tensor | None = None, location: Location | None = None
) -> Tensor:
    """Stamp ``patch`` onto images: ``x' = (1 - m) * x + m * p`` inside the patch region.

    BadNets (Gu, Dolan-Gavitt & Garg, 2017) threat model: the attacker poisons training data with
    a fixed visible patch and relabels it to the target class.

    Args:
        x: images ``[N, C, H, W]`` in ``[0, 1]``.
        patch: ``[C, p, q]``, ``[1, p, q]`` or ``[p, q]`` (broadcast over channels), or a
            per-sample ``[N, C, p, q]``.
        mask: blending mask broadcastable to the patch (``[p, q]``, ``[1, p, q]``, ``[C, p, q]``),
            values in ``[0, 1]``; ``None`` means all ones (the patch replaces the pixels).
        location: where the patch's top-left corner goes (see :func:`resolve_location`). ``None``
            means the patch (and mask) cover the whole image, ``p == H`` and ``q == W`` — the
            full-image mask form used by trigger reverse-engineering.

    Returns:
        A new tensor, same shape, dtype and device as ``x``; ``x`` is not modified.

    Example:
        >>> x = torch.zeros(1, 1, 4, 4)
        >>> stamp_patch(x, torch.ones(2, 2), location=(1, 1))[0, 0]
        tensor([[0., 0., 0., 0.],
                [0., 1., 1., 0.],
                [0., 1., 1., 0.],
                [0., 0., 0., 0.]])
    """
    if x.dim() != 4:
        raise ValueError(f"x must have shape [N, C, H, W], got shape {tuple(x.shape)}")
    if not isinstance(patch, Tensor):
        raise TypeError(f"patch must be a torch.Tensor, got {type(patch).__name__}")
    if patch.dim() == 2:
        patch = patch.unsqueeze(0)
    if patch.dim() not in (3, 4):
        raise ValueError(f"patch must have shape [C, p, q], [p, q] or [N, C, p, q], got shape {tuple(patch.shape)}")
    _, c, h, w = x.shape
    pc, p, q = patch.shape[-3:]
    if pc not in (1, c):
        raise ValueError(f"patch has {pc} channels but the images have {c}; use 1 (broadcast) or {c} channels")
    if location is None:
        if (p, q) != (h, w):
            raise ValueError(
                f"patch of size {(p, q)} needs a location; without one it must cover the image size {(h, w)}"
            )
        row, col = 0, 0
    else:
        row, col = resolve_location(location, (p, q), (h, w))
    patch = patch.to(device=x.device, dtype=x.dtype)
    if mask is not None:
        if not isinstance(mask, Tensor):
            raise TypeError(f"mask must be a torch.Tensor or None, got {type(mask).__name__}")
        mask = mask.to(device=x.device, dtype=x.dtype)
        if mask.dim() == 2:
            mask = mask.unsqueeze(0)
        if tuple(mask.shape[-2:]) != (p, q) or mask.shape[-3] not in (1, c):
            raise ValueError(
                f"mask of shape {tuple(mask.shape)} does not match the patch {(pc, p, q)}; "
                f"expected [{p}, {q}], [1, {p}, {q}] or [{c}, {p}, {q}]"
            )
    out = x.clone()
    region = x[:, :, row : row + p, col : col + q]
    if mask is None:
        stamped = patch.expand_as(region)
    else:
        stamped = (1 - mask) * region + mask * patch
    out[:, :, row : row + p, col : col + q] = stamped
    return out


# -- blending ------------------------------------------------------------------------------------
def resize_pattern(pattern: Tensor, height: int, width: int) -> Tensor:
    """Resize a ``[C, h, w]`` pattern to ``[C, height, width]`` (bilinear, antialiased when shrinking).

    Returns the pattern itself when it already has the requested size. Output is clamped to ``[0, 1]``.
    """
    if tuple(pattern.shape[-2:]) == (height, width):
        return pattern
    work = pattern if pattern.dtype in (torch.float32, torch.float64) else pattern.float()
    out = F.interpolate(work.unsqueeze(0), size=(height, width), mode="bilinear", align_corners=False, antialias=True)
    return out[0].clamp(0, 1).to(pattern.dtype)


def blend(x: Tensor, pattern: Tensor, alpha: float | Tensor) -> Tensor:
    """Blend images with a pattern: ``x' = (1 - alpha) * x + alpha * p``.

    Blended attack (Chen et al., "Targeted Backdoor Attacks on Deep Learning Systems Using Data
    Poisoning", 2017): a dirty-label attack whose trigger is a faint whole-image pattern.

    Args:
        x: images ``[N, C, H, W]`` in ``[0, 1]``.
        pattern: ``[C, H, W]``, ``[1, H, W]``, ``[H, W]`` or ``[N, C, H, W]``, in ``[0, 1]``,
            the same spatial size as ``x`` (see :func:`resize_pattern`).
        alpha: blend weight in ``[0, 1]`` (a float, or a tensor broadcastable to ``x``).

    Returns:
        The blended images, clamped to ``[0, 1]`` against round-off; same dtype and device as ``x``.

    Example:
        >>> x = torch.zeros(1, 3, 8, 8)
        >>> blend(x, torch.ones(3, 8, 8), 0.2).max().item()
        0.20000000298023224
    """
    if x.dim() != 4:
        raise ValueError(f"x must have shape [N, C, H, W], got shape {tuple(x.shape)}")
    if not isinstance(pattern, Tensor):
        raise TypeError(f"pattern must be a torch.Tensor, got {type(pattern).__name__}")
    if pattern.dim() == 2:
        pattern = pattern.unsqueeze(0)
    if tuple(pattern.shape[-2:]) != tuple(x.shape[-2:]) or pattern.shape[-3] not in (1, x.shape[1]):
        raise ValueError(
            f"pattern of shape {tuple(pattern.shape)} does not fit images of shape {tuple(x.shape)}; "
            f"expected [{x.shape[1]} or 1, {x.shape[2]}, {x.shape[3]}] (resize it with resize_pattern)"
        )
    pattern = pattern.to(device=x.device, dtype=x.dtype)
    if isinstance(alpha, Tensor):
        alpha = alpha.to(device=x.device, dtype=x.dtype)
    return ((1 - alpha) * x + alpha * pattern).clamp(0, 1)


# -- warping (WaNet) -----------------------------------------------------------------------------
def _grid_dtype(device: torch.device) -> torch.dtype:
    # Sampling grids are built in float64 so that a zero field reproduces the image to ~1e-12
    # (float32 normalised coordinates are off by a few ulps, i.e. ~1e-5 on 64x64 images).
    # MPS has no float64.
    return torch.float32 if device.type == "mps" else torch.float64


def wanet_noise(k: int = 4, generator: torch.Generator | None = None) -> Tensor:
    """The WaNet control field: ``[2, k, k]`` uniform in ``[-1, 1]``, divided by its mean absolute value.

    Channel 0 is the horizontal (x) displacement, channel 1 the vertical (y) one. The field does not
    depend on the image size; :func:`wanet_grid` upsamples it.

    Args:
        k: control grid size (the paper uses 4 on CIFAR-10/GTSRB/MNIST).
        generator: random source; pass ``seeded_generator(seed)`` for reproducibility (``None``
            draws from the global RNG).
    """
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"k must be an int, got {k!r}")
    if k < 2:
        raise ValueError(f"k must be >= 2 (a 1x1 control grid is a uniform shift, not a warp), got {k}")
    device = generator.device if generator is not None else torch.device("cpu")
    field = torch.rand((2, k, k), generator=generator, device=device, dtype=torch.float32) * 2 - 1
    return field / field.abs().mean()


def wanet_grid(
    noise: Tensor,
    height: int,
    width: int,
    s: float = 0.5,
    grid_rescale: float = 1.0,
    *,
    mode: str = "bicubic",
    dtype: torch.dtype | None = None,
) -> Tensor:
    """The WaNet sampling grid ``clamp((identity + s * upsample(noise) / size) * grid_rescale, -1, 1)``.

    WaNet (Nguyen & Tran, "WaNet - Imperceptible Warping-based Backdoor Attack", ICLR 2021):
    a dirty-label attack whose trigger is a smooth, nearly invisible warp. The identity grid is
    in the normalised coordinates of ``F.grid_sample(align_corners=True)``; the displacement is
    ``s`` times the upsampled field divided by the image size along that axis (``W`` for x,
    ``H`` for y), the scaling of the published implementation on square images.

    Args:
        noise: the ``[2, k, k]`` control field (:func:`wanet_noise`).
        height, width: image size.
        s: warping strength (``s = 0`` gives the identity grid).
        grid_rescale: factor applied to the whole grid before clamping (1 in the paper).
        mode: ``"bicubic"`` (paper) or ``"bilinear"`` upsampling of the field.
        dtype: grid dtype; default float64 (float32 on MPS) for an accurate identity.

    Returns:
        ``[1, height, width, 2]`` grid on ``noise``'s device, values in ``[-1, 1]``.

    Example:
        >>> g = wanet_grid(torch.zeros(2, 4, 4), 8, 8, s=0.5)
        >>> g.shape, float(g.abs().max())
        (torch.Size([1, 8, 8, 2]), 1.0)
    """
    if not isinstance(noise, Tensor) or noise.dim() != 3 or noise.shape[0] != 2:
        shape = tuple(noise.shape) if isinstance(noise, Tensor) else type(noise).__name__
        raise ValueError(f"noise must be a [2, k, k] tensor, got {shape}")
    for name, v in (("height", height), ("width", width)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be an int >= 1, got {v!r}")
    for name, v in (("s", s), ("grid_rescale", grid_rescale)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(float(v)):
            raise TypeError(f"{name} must be a finite real number, got {v!r}")
    if mode not in ("bicubic", "bilinear"):
        raise ValueError(f"mode must be one of ['bicubic', 'bilinear'], got {mode!r}")
    device = noise.device
    dtype = dtype or _grid_dtype(device)
    field = F.interpolate(noise.to(dtype).unsqueeze(0), size=(height, width), mode=mode, align_corners=True)
    field = field[0].permute(1, 2, 0)  # [H, W, 2], (x, y)
    ys = torch.linspace(-1, 1, height, device=device, dtype=dtype)
    xs = torch.linspace(-1, 1, width, device=device, dtype=dtype)
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    identity = torch.stack((gx, gy), dim=-1)
    scale = torch.tensor([float(s) / width, float(s) / height], device=device, dtype=dtype)
    grid = (identity + field * scale) * float(grid_rescale)
    return grid.clamp(-1, 1).unsqueeze(0)


def wanet_noise_grid(grid: Tensor, num: int, generator: torch.Generator | None = None) -> Tensor:
    """WaNet's "noise mode" grids: ``clamp(grid + (u * 2 - 1) / size, -1, 1)``, ``u ~ U[0, 1)`` per sample.

    Samples warped with these grids keep their true labels, teaching the model that warps other
    than the exact trigger field mean nothing.

    Args:
        grid: a ``[1, H, W, 2]`` trigger grid (:func:`wanet_grid`).
        num: number of independent random grids.
        generator: random source (its device is used for drawing); ``None`` uses the global RNG.

    Returns:
        ``[num, H, W, 2]`` grids, same dtype and device as ``grid``.
    """
    if grid.dim() != 4 or grid.shape[-1] != 2:
        raise ValueError(f"grid must have shape [1, H, W, 2], got shape {tuple(grid.shape)}")
    if isinstance(num, bool) or not isinstance(num, int) or num < 0:
        raise ValueError(f"num must be an int >= 0, got {num!r}")
    _, h, w, _ = grid.shape
    u = _rand_like_on((num, h, w, 2), grid, generator)
    size = torch.tensor([w, h], device=grid.device, dtype=grid.dtype)
    return (grid + (u * 2 - 1) / size).clamp(-1, 1)


def warp(x: Tensor, grid: Tensor, mode: str = "bilinear") -> Tensor:
    """Resample images on a sampling grid: ``F.grid_sample(x, grid, align_corners=True)``.

    Args:
        x: images ``[N, C, H, W]`` in ``[0, 1]``.
        grid: ``[1, H', W', 2]`` (shared) or ``[N, H', W', 2]`` (per sample) normalised coordinates.
        mode: ``"bilinear"`` or ``"nearest"``.

    Returns:
        ``[N, C, H', W']`` images in ``[0, 1]``, same dtype and device as ``x``. Sampling runs in
        the grid's dtype (float64 from :func:`wanet_grid`) and is cast back.
    """
    if x.dim() != 4:
        raise ValueError(f"x must have shape [N, C, H, W], got shape {tuple(x.shape)}")
    if not isinstance(grid, Tensor) or grid.dim() != 4 or grid.shape[-1] != 2 or grid.shape[0] not in (1, x.shape[0]):
        shape = tuple(grid.shape) if isinstance(grid, Tensor) else type(grid).__name__
        raise ValueError(f"grid must have shape [1, H, W, 2] or [{x.shape[0]}, H, W, 2], got {shape}")
    if mode not in ("bilinear", "nearest"):
        raise ValueError(f"mode must be one of ['bilinear', 'nearest'], got {mode!r}")
    work = torch.promote_types(x.dtype, grid.dtype)
    if not work.is_floating_point or work in (torch.float16, torch.bfloat16):
        work = torch.float32
    grid = grid.to(device=x.device, dtype=work).expand(x.shape[0], -1, -1, -1)
    out = F.grid_sample(x.to(work), grid, mode=mode, padding_mode="border", align_corners=True)
    return out.clamp(0, 1).to(x.dtype)


# -- affine transforms (BATT, PhysicalBA) --------------------------------------------------------
def _per_sample(v: float | Tensor, n: int, like: Tensor) -> Tensor:
    t = torch.as_tensor(v, dtype=like.dtype, device=like.device)
    return t.expand(n) if t.dim() == 0 else t.reshape(n).to(like)


def affine(
    x: Tensor,
    angle: float | Tensor = 0.0,
    scale: float | Tensor = 1.0,
    translate: Tuple[float | Tensor, float | Tensor] = (0.0, 0.0),
    hflip: bool | Tensor = False,
) -> Tensor:
    """Per-sample affine transform about the image centre, bilinear with zero fill.

    The output pixel at offset ``p`` from the centre (in pixels, ``y`` down) shows the input at
    ``F R(angle)^-1 (p - t) / scale``: content is (optionally) flipped left-right, rotated
    counter-clockwise by ``angle`` degrees, scaled by ``scale`` and moved by ``t = (tx, ty)``
    pixels. This is ``torchvision.transforms.v2.functional.rotate``'s convention (``align_corners=False``
    sampling, zero fill); torchvision's ``affine`` equals it with ``-angle`` (it turns clockwise).
    Batched with one transform per sample.

    Args:
        x: images ``[N, C, H, W]``.
        angle: degrees, a float or a ``[N]`` tensor.
        scale: ``> 0``, a float or ``[N]`` (``< 1`` shrinks the content; the border is zero).
        translate: ``(tx, ty)`` in pixels, floats or ``[N]`` tensors.
        hflip: flip left-right before rotating, a bool or a ``[N]`` bool tensor.

    Returns:
        ``[N, C, H, W]`` in the dtype and on the device of ``x``, clamped to ``[0, 1]``.

    Example:
        >>> x = torch.rand(2, 1, 8, 8)
        >>> torch.allclose(affine(x, angle=0.0), x, atol=1e-6)
        True
        >>> torch.allclose(affine(x, hflip=True), x.flip(-1), atol=1e-6)
        True
    """
    if x.dim() != 4:
        raise ValueError(f"x must have shape [N, C, H, W], got shape {tuple(x.shape)}")
    n, _, h, w = x.shape
    work = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
    ref = torch.empty(0, dtype=torch.float64 if x.device.type != "mps" else torch.float32, device=x.device)
    a = torch.deg2rad(_per_sample(angle, n, ref))
    s = _per_sample(scale, n, ref)
    if bool((s <= 0).any()):
        raise ValueError(f"scale must be > 0, got {s.min().item()}")
    tx, ty = _per_sample(translate[0], n, ref), _per_sample(translate[1], n, ref)
    flip = torch.as_tensor(hflip, device=x.device).expand(n).to(ref.dtype)
    fx = 1 - 2 * flip  # -1 flips
    cos, sin = torch.cos(a), torch.sin(a)
    # M = F R^-1 / s in pixel coordinates (y down, counter-clockwise visual rotation)
    m00, m01 = fx * cos / s, -fx * sin / s
    m10, m11 = sin / s, cos / s
    # to align_corners=False normalised coordinates: D^-1 M D with D = diag(W/2, H/2)
    t00, t01 = m00, m01 * h / w
    t10, t11 = m10 * w / h, m11
    off_x = -(m00 * tx + m01 * ty) / (w / 2)
    off_y = -(m10 * tx + m11 * ty) / (h / 2)
    theta = torch.stack((torch.stack((t00, t01, off_x), -1), torch.stack((t10, t11, off_y), -1)), 1)
    grid = F.affine_grid(theta.to(work), [n, x.shape[1], h, w], align_corners=False)
    out = F.grid_sample(x.to(work), grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out.clamp(0, 1).to(x.dtype)


def rotate(x: Tensor, angle: float | Tensor) -> Tensor:
    """Rotate images counter-clockwise by ``angle`` degrees about the centre (bilinear, zero fill).

    BATT (Xu et al., 2023): the rotation itself is the trigger. Equals
    ``torchvision.transforms.v2.functional.rotate(x, angle, InterpolationMode.BILINEAR)``.

    Example:
        >>> x = torch.zeros(1, 1, 5, 5); x[0, 0, 0, 2] = 1.0     # a dot above the centre
        >>> rotate(x, 90.0)[0, 0, 2, 0].item() > 0.99          # a quarter turn left: now left of it
        True
    """
    return affine(x, angle=angle)


def translate(x: Tensor, dx: int, dy: int) -> Tensor:
    """Shift images by whole pixels, ``dx`` right and ``dy`` down, filling with zeros (exact, no resampling).

    Example:
        >>> x = torch.arange(1, 5.0).reshape(1, 1, 2, 2) / 4
        >>> translate(x, 1, 0)[0, 0]
        tensor([[0.0000, 0.2500],
                [0.0000, 0.7500]])
    """
    if x.dim() != 4:
        raise ValueError(f"x must have shape [N, C, H, W], got shape {tuple(x.shape)}")
    for name, v in (("dx", dx), ("dy", dy)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"{name} must be an int number of pixels, got {v!r}")
    h, w = x.shape[-2:]
    out = torch.zeros_like(x)
    if abs(dx) >= w or abs(dy) >= h:
        return out
    src_r = slice(max(0, -dy), h - max(0, dy))
    dst_r = slice(max(0, dy), h - max(0, -dy))
    src_c = slice(max(0, -dx), w - max(0, dx))
    dst_c = slice(max(0, dx), w - max(0, -dx))
    out[:, :, dst_r, dst_c] = x[:, :, src_r, src_c]
    return out


def adjust_brightness_contrast(x: Tensor, brightness: float | Tensor = 1.0, contrast: float | Tensor = 1.0) -> Tensor:
    """Colour jitter: ``y = clamp(b x)``, then ``clamp((y - m) c + m)`` with ``m`` the mean grey level of ``y``.

    Per-sample factors (``[N]`` tensors) or one float; 1 leaves the image unchanged. The grey level
    of RGB images uses the ITU-R 601 weights (0.299, 0.587, 0.114), as torchvision does.

    Example:
        >>> x = torch.full((1, 1, 2, 2), 0.5)
        >>> adjust_brightness_contrast(x, brightness=1.2).flatten().tolist()
        [0.6000000238418579, 0.6000000238418579, 0.6000000238418579, 0.6000000238418579]
    """
    if x.dim() != 4:
        raise ValueError(f"x must have shape [N, C, H, W], got shape {tuple(x.shape)}")
    n, c = x.shape[:2]
    b = _per_sample(brightness, n, x).view(n, 1, 1, 1)
    k = _per_sample(contrast, n, x).view(n, 1, 1, 1)
    y = (x * b).clamp(0, 1)
    if c == 3:
        weights = torch.tensor([0.299, 0.587, 0.114], dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        grey = (y * weights).sum(1, keepdim=True)
    else:
        grey = y.mean(1, keepdim=True)
    m = grey.mean(dim=(1, 2, 3), keepdim=True)
    return ((y - m) * k + m).clamp(0, 1)


# -- trigger pieces (Adap-Blend, Adap-Patch) -----------------------------------------------------
def random_subsets(n: int, pieces: int, k: int, generator: torch.Generator | None = None,
                   device: torch.device | str | None = None) -> Tensor:
    """``[n, pieces]`` bool: each row marks ``k`` of the ``pieces`` chosen uniformly at random.

    Drawn on the generator's device (CPU when ``generator`` is None), returned on ``device``.

    Example:
        >>> m = random_subsets(3, 16, 8, generator=seeded_generator(0))
        >>> m.shape, m.sum(1).tolist()
        (torch.Size([3, 16]), [8, 8, 8])
    """
    if not 0 <= k <= pieces:
        raise ValueError(f"k must be in [0, {pieces}] (the number of pieces), got {k}")
    gen_device = generator.device if generator is not None else torch.device("cpu")
    order = torch.rand((n, pieces), generator=generator, device=gen_device).argsort(dim=1)
    chosen = torch.zeros((n, pieces), dtype=torch.bool, device=gen_device)
    chosen.scatter_(1, order[:, :k], True)
    return chosen.to(device if device is not None else gen_device)


def grid_cells(height: int, width: int, rows: int, cols: int, device: torch.device | str | None = None) -> Tensor:
    """``[height, width]`` long tensor: the index ``r * cols + c`` of the grid cell of each pixel.

    Cell ``(r, c)`` holds rows ``floor(r H / rows)`` to ``floor((r + 1) H / rows) - 1`` (and so for
    columns), so every cell is non-empty when ``rows <= H`` and ``cols <= W``.

    Example:
        >>> grid_cells(4, 4, 2, 2)
        tensor([[0, 0, 1, 1],
                [0, 0, 1, 1],
                [2, 2, 3, 3],
                [2, 2, 3, 3]])
    """
    if rows > height or cols > width or rows < 1 or cols < 1:
        raise ValueError(f"a {rows}x{cols} grid of pieces does not fit a {height}x{width} image: each piece needs at "
                         f"least one pixel (rows <= {height}, cols <= {width})")
    r = torch.div(torch.arange(height, device=device) * rows, height, rounding_mode="floor")
    c = torch.div(torch.arange(width, device=device) * cols, width, rounding_mode="floor")
    return r[:, None] * cols + c[None, :]


def piece_mask(chosen: Tensor, cells: Tensor) -> Tensor:
    """``[N, 1, H, W]`` 0/1 mask of the chosen cells: ``chosen[N, pieces]`` bool, ``cells`` from :func:`grid_cells`."""
    return chosen[:, cells].unsqueeze(1)
