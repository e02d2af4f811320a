"""ISSBA: sample-specific invisible triggers from an image-steganography encoder."""

from __future__ import annotations

from typing import Any, Dict, Optional, Sequence

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from ..validation import check_positive_float, check_positive_int
from . import steganography as STEGA
from .base import ATTACKS, _check_image_shape
from .fitted import FittedAttack, _seeded_subset, dataset_images


def _parse_code(code: Any) -> Tensor:
    if isinstance(code, str):
        if not code or set(code) - {"0", "1"}:
            raise ValueError(f"code must be a string of 0/1 characters or a list of 0/1 ints, got {code!r}")
        return torch.tensor([int(c) for c in code], dtype=torch.float32)
    if isinstance(code, (list, tuple)) and code and all(isinstance(b, int) and b in (0, 1) for b in code):
        return torch.tensor(list(code), dtype=torch.float32)
    raise ValueError(f"code must be a string of 0/1 characters or a non-empty list of 0/1 ints, got {code!r}")


@ATTACKS.register("issba")
class ISSBA(FittedAttack):
    """ISSBA: an invisible, sample-specific trigger made by a steganography encoder hiding a fixed code.

    Paper: Li, Li, Wu, Li, He & Lyu, "Invisible Backdoor Attack with Sample-Specific Triggers"
    (ICCV 2021). Threat model: dirty-label data poisoning with triggers that differ per image.
    ``fit`` trains a small StegaStamp-style encoder/decoder pair
    (:mod:`lightning_backdoor.attacks.steganography`) **on the training set itself** (seeded random
    subset of ``samples`` images, ``epochs`` epochs of Adam with random codes, bit cross-entropy
    plus an image MSE term), then every poisoned image is ``encode(x, code)`` for one fixed
    ``code`` of ``code_bits`` bits (seeded, or given): the residual ``|x' - x| <= max_residual``
    differs per image. The encoder (a few thousand weights) is kept as buffers and reused for
    every poisoned training and test image; the poisoned training images are computed in batches
    by ``fit`` and stored as ``uint8`` keyed by dataset index, test images are encoded in batches
    by the poisoned test set.

    Paper defaults vs ours: StegaStamp (a U-Net, 100 bits, trained for many epochs on ImageNet or
    the dataset) vs a two-layer encoder of width ``hidden`` = 16 hiding ``code_bits`` = 16 bits,
    5 epochs on 2,000 images in batches of 32 (about 15 s on one CPU core for MNIST-5k, bit
    accuracy ≈ 0.99). The encoder spreads the code over an 8x8 message map, so ``code_bits`` may
    not exceed 64.

    Args:
        code_bits: length of the hidden code, ``1 <= code_bits <= 64``.
        code: the code as a ``"0101..."`` string or a list of 0/1 (``None``: drawn from ``seed``);
            shorter codes are padded with zeros to ``code_bits``, longer ones are refused.
        hidden: encoder/decoder width.
        max_residual: L∞ bound of the residual, in ``(0, 1]``.
        epochs, samples, lr, image_weight: training of the encoder/decoder.
        batch_size, device, seed: see :class:`~lightning_backdoor.attacks.fitted.FittedAttack`.

    Example:
        >>> import torch
        >>> from torch.utils.data import TensorDataset
        >>> data = TensorDataset(torch.rand(16, 1, 8, 8), torch.arange(16) % 2)
        >>> issba = ISSBA(code_bits=4, hidden=8, epochs=1).fit(data, target=1, indices=[0, 2])
        >>> x = torch.rand(3, 1, 8, 8)
        >>> bool((issba(x) - x).abs().max() <= issba.max_residual + 1e-6), issba.sample_images.shape
        (True, torch.Size([2, 1, 8, 8]))
    """

    name = "issba"
    dirty_label = True
    per_sample = True
    _lazy_buffers = FittedAttack._lazy_buffers + ("code",) + STEGA.PARAM_KEYS

    def __init__(self, code_bits: int = 16, code: Optional[str | Sequence[int]] = None, hidden: int = 16,
                 max_residual: float = 0.05, epochs: int = 5, samples: Optional[int] = 2000, lr: float = 3e-3,
                 image_weight: float = 1.0, batch_size: int = 256, device: Optional[str] = None,
                 seed: int = 0) -> None:
        super().__init__(None, None, 0, None, None, batch_size, device, seed)
        self.hidden = check_positive_int(hidden, "hidden")
        self.code_bits = check_positive_int(code_bits, "code_bits")
        limit = STEGA.GRID * STEGA.GRID
        if self.code_bits > limit:
            raise ValueError(f"code_bits={self.code_bits} is longer than the encoder supports: it spreads the code over "
                             f"a {STEGA.GRID}x{STEGA.GRID} message map, so it hides at most {limit} bits")
        self.user_code = None if code is None else "".join(str(int(b)) for b in _parse_code(code).tolist())
        if self.user_code is not None and len(self.user_code) > self.code_bits:
            raise ValueError(f"code has {len(self.user_code)} bits but the encoder hides code_bits={self.code_bits}; "
                             f"use a code of at most {self.code_bits} bits or raise code_bits (at most {limit})")
        self.max_residual = check_positive_float(max_residual, "max_residual")
        if self.max_residual > 1:
            raise ValueError(f"max_residual must be in (0, 1], got {max_residual}")
        self.epochs = check_positive_int(epochs, "epochs")
        self.samples = None if samples is None else check_positive_int(samples, "samples")
        self.lr = check_positive_float(lr, "lr")
        self.image_weight = check_positive_float(image_weight, "image_weight")
        self.register_buffer("code", None)
        for k in STEGA.PARAM_KEYS:
            self.register_buffer(k, None)

    # -- state ---------------------------------------------------------------------------------------
    def _params(self) -> Dict[str, Tensor]:
        return {k: getattr(self, k) for k in STEGA.PARAM_KEYS}

    def _fitted_state(self) -> bool:
        return self.enc_w1 is not None and self.code is not None

    def _make_code(self) -> Tensor:
        if self.user_code is not None:
            bits = torch.tensor([float(c) for c in self.user_code])
            return torch.cat([bits, torch.zeros(self.code_bits - len(bits))])
        return torch.randint(0, 2, (self.code_bits,), generator=torch.Generator().manual_seed(self.seed + 7)).float()

    def build(self, channels: int, height: int, width: int) -> "ISSBA":
        _check_image_shape(channels, height, width)
        if self.enc_w3 is not None and self.enc_w3.shape[0] != channels:
            raise ValueError(f"the fitted encoder takes {self.enc_w3.shape[0]}-channel images but the images have "
                             f"{channels}; fit a new ISSBA on this data")
        return self

    # -- trigger -------------------------------------------------------------------------------------
    def apply_trigger(self, x: Tensor) -> Tensor:
        self._require_fitted("steganography encoder")
        self.build(x.shape[1], x.shape[2], x.shape[3])
        return STEGA.encode(x, self.code, self._params(), self.max_residual)

    def _fit(self, dataset: Dataset, labels: Tensor, target: int, indices: Tensor, model: Optional[nn.Module],
             num_classes: int) -> None:
        idx = _seeded_subset(len(labels), self.samples, self.seed)
        images = dataset_images(dataset, idx)
        g = torch.Generator().manual_seed(self.seed)
        params = STEGA.init_params(images.shape[1], self.code_bits, self.hidden, g)
        device = self._work_device()
        params = STEGA.train_steganography(params, images, self.epochs, self.max_residual, batch_size=32, lr=self.lr,
                                           image_weight=self.image_weight, generator=g, device=device)
        for k, v in params.items():
            setattr(self, k, v)
        self.code = self._make_code()
        probe = images[: min(len(images), 256)]
        self.fit_info["bit_accuracy"] = STEGA.bit_accuracy(probe, self.code, self._params(), self.max_residual)

    def _train_images(self, x: Tensor, indices: Tensor) -> Tensor:
        device = self._work_device()
        return self.apply_trigger(x.to(device)).cpu()

    def hparams(self) -> Dict[str, Any]:
        return {"code_bits": self.code_bits, "code": self.user_code, "hidden": self.hidden,
                "max_residual": self.max_residual, "epochs": self.epochs, "samples": self.samples, "lr": self.lr,
                "image_weight": self.image_weight, "batch_size": self.batch_size, "seed": self.seed}
