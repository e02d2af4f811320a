"""Adap-Blend and Adap-Patch: split triggers, a random part at training time, cover samples (Qi et al., ICLR 2023)."""

from __future__ import annotations

import math
from typing import Any, Dict, Sequence, Tuple

import torch
from torch import Tensor

from ..validation import check_images, check_non_negative_float, check_positive_int, check_probability, check_seed, \
    check_size2
from . import functional as AF
from .base import ATTACKS, Attack, _check_image_shape, _check_trigger_tensor


def _check_pieces(pieces: Any) -> Tuple[int, int]:
    """``pieces``: a perfect square ``k * k`` (a k x k grid) or a ``(rows, cols)`` pair."""
    if isinstance(pieces, int) and not isinstance(pieces, bool):
        check_positive_int(pieces, "pieces")
        k = math.isqrt(pieces)
        if k * k != pieces:
            raise ValueError(f"pieces={pieces} is not a square number; use k*k pieces (a k x k grid, e.g. 16) or "
                             "a (rows, cols) pair")
        return k, k
    return check_size2(pieces, "pieces")


class _SplitTrigger(Attack):
    """Shared parts of the adaptive attacks: cover samples and a random subset of pieces at training time."""

    sample_seeded = True
    default_rate = 0.003

    def cover(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Cover (regularisation) samples: the training-time trigger (random pieces); the label is kept."""
        x = check_images(x, "x", allow_single=True)
        single = x.dim() == 3
        xb = x.unsqueeze(0) if single else x
        out = self.apply_train_trigger(xb, generator)
        return out[0] if single else out


@ATTACKS.register("adaptive_blend")
class AdaptiveBlend(_SplitTrigger):
    """Adap-Blend: a blend pattern split into a grid of pieces; a random half at training time, all at test time.

    Paper: Qi, Xie, Li, Wang & Mittal, "Revisiting the Assumption of Latent Separability for
    Backdoor Defenses" (ICLR 2023). Threat model: dirty-label data poisoning built to defeat
    latent-separation defences (spectral signatures, activation clustering, SCAn): a very low
    poison rate, plus *cover* samples that carry the (partial) trigger but keep their true labels,
    and a trigger that is never complete during training.

    Test time: ``x' = (1 - alpha) x + alpha p`` (the whole pattern, ``alpha`` = 0.2).
    Training time (poisoned and cover samples): the image is split into a ``rows x cols`` grid
    (``pieces`` = 16: 4 x 4) and only ``train_pieces`` cells drawn at random per sample carry the
    pattern, at opacity ``train_alpha`` (0.15): ``x' = x`` outside them, ``(1 - a) x + a p`` inside.
    So the pixels a training trigger changes are a subset of those the test trigger changes (and
    equal to them when ``train_alpha == alpha``).

    Counts (the data module's convention): ``rate`` is the poisoned share of the whole training set
    (the paper: 0.3%, ``default_rate``), and ``cover_ratio`` (1.0) cover samples per poisoned one.

    Args:
        alpha: test-time opacity, ``(0, 1]`` (default 0.2).
        train_alpha: training-time opacity, ``(0, 1]`` (default 0.15).
        pieces: number of pieces, a square ``k * k`` (default 16) or ``(rows, cols)``; each piece
            needs at least one pixel.
        train_pieces: pieces applied per training sample, ``1 .. pieces`` (default: half of them).
        pattern: optional ``[C, H, W]`` or ``[H, W]`` pattern in ``[0, 1]`` (resized to the images);
            default seeded uniform noise at the image size, as :class:`~lightning_backdoor.attacks.Blended`.
        cover_ratio: cover samples per poisoned sample, ``>= 0`` (default 1.0).
        seed: seed of the noise pattern.

    Example:
        >>> import torch
        >>> a = AdaptiveBlend(seed=0)
        >>> x = torch.rand(2, 3, 32, 32)
        >>> torch.allclose(a(x), 0.8 * x + 0.2 * a.pattern)
        True
        >>> xt = a.train_trigger(x, torch.Generator().manual_seed(0))
        >>> changed = (xt != x).flatten(1).float().mean(1)     # about half of the image per sample
        >>> bool(((changed > 0.4) & (changed < 0.6)).all())
        True
    """

    name = "adaptive_blend"
    _lazy_buffers = ("pattern",)
    pattern: Tensor | None

    def __init__(
        self,
        alpha: float = 0.2,
        train_alpha: float = 0.15,
        pieces: int | Sequence[int] = 16,
        train_pieces: int | None = None,
        pattern: Tensor | None = None,
        cover_ratio: float = 1.0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.alpha = check_probability(alpha, "alpha", low_open=True)
        self.train_alpha = check_probability(train_alpha, "train_alpha", low_open=True)
        self.pieces = _check_pieces(pieces)
        total = self.pieces[0] * self.pieces[1]
        self.train_pieces = max(1, total // 2) if train_pieces is None else check_positive_int(train_pieces,
                                                                                               "train_pieces")
        if self.train_pieces > total:
            raise ValueError(f"train_pieces={train_pieces} is more than the {total} pieces the pattern is split into; "
                             f"use 1 <= train_pieces <= {total}")
        self.cover_ratio = check_non_negative_float(cover_ratio, "cover_ratio")
        self.seed = check_seed(seed)
        self.user_pattern = pattern is not None
        if pattern is not None:
            pattern = _check_trigger_tensor(pattern, "pattern")
        self.register_buffer("pattern", pattern)

    def build(self, channels: int, height: int, width: int) -> "AdaptiveBlend":
        """Create the noise pattern (if not yet); check the pattern and the pieces fit ``channels x height x width``."""
        self._check_shape(channels, height, width)
        return self

    def _check_shape(self, channels: int, height: int, width: int, device: torch.device | None = None) -> None:
        _check_image_shape(channels, height, width)
        rows, cols = self.pieces
        if rows > height or cols > width:
            raise ValueError(f"pieces={rows * cols} ({rows}x{cols}) splits a {height}x{width} trigger into more pieces "
                             f"than it has pixels along an axis; use at most {height} rows and {width} columns")
        if self.pattern is None:
            self.pattern = AF.seeded_rand((channels, height, width), self.seed).to(device or "cpu")
        pc, ph, pw = self.pattern.shape
        if pc not in (1, channels):
            raise ValueError(f"pattern has {pc} channels but the images have {channels}; "
                             f"use a 1-channel (broadcast) or {channels}-channel pattern")
        if not self.user_pattern and (ph, pw) != (height, width):
            raise ValueError(f"the seeded noise pattern was built for {ph}x{pw} images, got {height}x{width} images; "
                             "create a new AdaptiveBlend instance for another image size")

    def _pattern(self, x: Tensor) -> Tensor:
        _, c, h, w = x.shape
        self._check_shape(c, h, w, device=x.device)
        return AF.resize_pattern(self.pattern.to(device=x.device, dtype=x.dtype), h, w)

    def apply_trigger(self, x: Tensor) -> Tensor:
        return AF.blend(x, self._pattern(x), self.alpha)

    def apply_train_trigger(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        pattern = self._pattern(x)
        n, _, h, w = x.shape
        chosen = AF.random_subsets(n, self.pieces[0] * self.pieces[1], self.train_pieces, generator, device=x.device)
        mask = AF.piece_mask(chosen, AF.grid_cells(h, w, *self.pieces, device=x.device))
        return torch.where(mask, AF.blend(x, pattern, self.train_alpha), x)

    def hparams(self) -> Dict[str, Any]:
        rows, cols = self.pieces
        return {
            "alpha": self.alpha,
            "train_alpha": self.train_alpha,
            "pieces": rows * cols if rows == cols else [rows, cols],
            "train_pieces": self.train_pieces,
            "pattern": {"shape": list(self.pattern.shape)} if self.user_pattern and self.pattern is not None else None,
            "cover_ratio": self.cover_ratio,
            "seed": self.seed,
        }


@ATTACKS.register("adaptive_patch")
class AdaptivePatch(_SplitTrigger):
    """Adap-Patch: several small patches; a random subset at training time, all of them at test time.

    Paper: Qi, Xie, Li, Wang & Mittal, "Revisiting the Assumption of Latent Separability for
    Backdoor Defenses" (ICLR 2023). Threat model as :class:`AdaptiveBlend`: dirty-label poisoning
    at a very low rate with cover samples, designed against latent-separation defences.

    The trigger's pieces are ``num_patches`` seeded noise patches of ``patch_size``, placed at
    seeded, non-overlapping cells of a grid of patch-sized cells (chosen at ``build`` for the image
    size). Test time: every patch, ``x' = (1 - alpha) x + alpha p_j`` on each patch region.
    Training time (poisoned and cover samples): ``train_patches`` of them drawn per sample, at
    opacity ``train_alpha``. The pixels a training trigger changes are a subset of the test
    trigger's (equal to them when ``train_alpha == alpha``).

    Counts: ``rate`` of the whole training set poisoned (the paper: 0.3%, ``default_rate``), and
    ``cover_ratio`` (2.0) cover samples per poisoned one.

    Args:
        patch_size: side of each patch, an int or ``(height, width)`` (default 3).
        num_patches: number of patches (pieces), ``>= 2`` (default 4).
        train_patches: patches applied per training sample, ``1 .. num_patches`` (default: half).
        alpha: test-time opacity, ``(0, 1]`` (default 1: the patches replace the pixels).
        train_alpha: training-time opacity, ``(0, 1]`` (default 1).
        cover_ratio: cover samples per poisoned sample, ``>= 0`` (default 2.0).
        seed: seed of the patches and their places.

    Example:
        >>> import torch
        >>> a = AdaptivePatch(patch_size=3, num_patches=4, seed=0).build(1, 28, 28)
        >>> a.patches.shape, a.locations.shape
        (torch.Size([4, 1, 3, 3]), torch.Size([4, 2]))
        >>> x = torch.rand(2, 1, 28, 28)
        >>> int((a(x) != x).flatten(1).sum(1).max())           # 4 patches of 9 pixels at test time
        36
    """

    name = "adaptive_patch"
    _lazy_buffers = ("patches", "locations")
    patches: Tensor | None
    locations: Tensor | None

    def __init__(
        self,
        patch_size: int | Sequence[int] = 3,
        num_patches: int = 4,
        train_patches: int | None = None,
        alpha: float = 1.0,
        train_alpha: float = 1.0,
        cover_ratio: float = 2.0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.patch_size = check_size2(patch_size, "patch_size")
        self.num_patches = check_positive_int(num_patches, "num_patches")
        if self.num_patches < 2:
            raise ValueError(f"num_patches must be >= 2 (one patch cannot be split between training and test time; "
                             f"that is BadNets), got {num_patches}")
        self.train_patches = max(1, self.num_patches // 2) if train_patches is None else check_positive_int(
            train_patches, "train_patches")
        if self.train_patches > self.num_patches:
            raise ValueError(f"train_patches={train_patches} is more than num_patches={self.num_patches}; "
                             f"use 1 <= train_patches <= {self.num_patches}")
        self.alpha = check_probability(alpha, "alpha", low_open=True)
        self.train_alpha = check_probability(train_alpha, "train_alpha", low_open=True)
        self.cover_ratio = check_non_negative_float(cover_ratio, "cover_ratio")
        self.seed = check_seed(seed)
        self.register_buffer("patches", None)
        self.register_buffer("locations", None)

    def build(self, channels: int, height: int, width: int) -> "AdaptivePatch":
        """Draw the patches and their places (if not yet) and check they fit ``channels x height x width`` images."""
        self._check_shape(channels, height, width)
        return self

    def _check_shape(self, channels: int, height: int, width: int, device: torch.device | None = None) -> None:
        _check_image_shape(channels, height, width)
        p, q = self.patch_size
        cells_r, cells_c = height // p, width // q
        if self.num_patches * p * q > height * width or self.num_patches > cells_r * cells_c:
            raise ValueError(
                f"num_patches={self.num_patches} patches of {p}x{q} do not fit side by side in a {height}x{width} "
                f"image (more trigger pixels than the image has, or more patches than the {cells_r * cells_c} "
                f"patch-sized cells); use at most {cells_r * cells_c} patches or a smaller patch_size")
        if self.patches is None:
            g = AF.seeded_generator(self.seed)
            self.patches = torch.rand((self.num_patches, channels, p, q), generator=g).to(device or "cpu")
            cells = torch.randperm(cells_r * cells_c, generator=g)[: self.num_patches]
            self.locations = torch.stack((cells // cells_c * p, cells % cells_c * q), 1).to(device or "cpu")
        if self.patches.shape[1] != channels:
            raise ValueError(f"the patches have {self.patches.shape[1]} channels but the images have {channels}; "
                             "create a new AdaptivePatch instance for other images")
        bottom = self.locations + torch.tensor([p, q], device=self.locations.device)
        if bool((bottom[:, 0] > height).any() or (bottom[:, 1] > width).any()):
            raise ValueError(f"the patches were placed for larger images than {height}x{width}; "
                             "create a new AdaptivePatch instance for another image size")

    def _stamp(self, x: Tensor, chosen: Tensor | None, alpha: float) -> Tensor:
        _, c, h, w = x.shape
        self._check_shape(c, h, w, device=x.device)
        out = x
        mask = torch.full((1, *self.patch_size), float(alpha), dtype=x.dtype, device=x.device)
        for j in range(self.num_patches):
            row, col = (int(v) for v in self.locations[j])
            stamped = AF.stamp_patch(out, self.patches[j], mask if alpha < 1 else None, location=(row, col))
            out = stamped if chosen is None else torch.where(chosen[:, j].view(-1, 1, 1, 1), stamped, out)
        return out.clamp(0, 1)

    def apply_trigger(self, x: Tensor) -> Tensor:
        return self._stamp(x, None, self.alpha)

    def apply_train_trigger(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        chosen = AF.random_subsets(x.shape[0], self.num_patches, self.train_patches, generator, device=x.device)
        return self._stamp(x, chosen, self.train_alpha)

    def hparams(self) -> Dict[str, Any]:
        p, q = self.patch_size
        return {
            "patch_size": p if p == q else [p, q],
            "num_patches": self.num_patches,
            "train_patches": self.train_patches,
            "alpha": self.alpha,
            "train_alpha": self.train_alpha,
            "cover_ratio": self.cover_ratio,
            "seed": self.seed,
        }
