"""Clean-label attacks prepared on a surrogate model: Label-Consistent, TUAP and NARCISSUS.

All three poison only training samples whose label already is the target (``dirty_label =
False``: :class:`~lightning_backdoor.data.PoisonedDataset` draws the poisoned set from the target
class and never relabels) and need ``fit(dataset, target)`` before they can poison (a
:class:`~lightning_backdoor.data.BackdoorDataModule` calls it in ``setup``). The surrogate model
is given or trained by the attack on the same data (see :mod:`lightning_backdoor.attacks.fitted`).

Default costs: the optimisation settings follow the papers where they are cheap (LC's ε, step
and 100 PGD steps; NARCISSUS' 16/255 bound), while the surrogate is a small CNN trained for two
epochs on 2,000 images, so each ``fit`` runs in well under two minutes on MNIST-5k on one CPU
core. The papers use larger surrogates (an adversarially trained ResNet for LC, a ResNet-18
trained on out-of-distribution data for NARCISSUS); pass one with ``surrogate=``/``surrogate_weights=``.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from ..utils import evaluating
from ..validation import check_bool, check_positive_float, check_positive_int
from . import adversarial as ADV
from .base import ATTACKS, _check_image_shape
from .fitted import FittedAttack, SurrogateSpec, _seeded_subset, dataset_images


def checkerboard(size: int) -> Tensor:
    """A ``[size, size]`` 0/1 checkerboard whose bottom-right pixel is 1 (white).

    Example:
        >>> checkerboard(3).tolist()
        [[1.0, 0.0, 1.0], [0.0, 1.0, 0.0], [1.0, 0.0, 1.0]]
    """
    i = size - 1 - torch.arange(size)
    return ((i[:, None] + i[None, :]) % 2 == 0).float()


def corner_trigger(x: Tensor, size: int, amplitude: float, all_corners: bool = False) -> Tensor:
    """Stamp a checkerboard of side ``size`` in the bottom-right corner (or all four, mirrored).

    White squares move pixels up by ``amplitude``, black ones down (``x' = clip(x + a·(2p - 1))``),
    so ``amplitude = 1`` gives a full black-and-white pattern and smaller values the reduced-amplitude
    trigger of Turner et al.

    Example:
        >>> x = torch.full((1, 1, 4, 4), 0.5)
        >>> corner_trigger(x, 2, 0.25)[0, 0].tolist()
        [[0.5, 0.5, 0.5, 0.5], [0.5, 0.5, 0.5, 0.5], [0.5, 0.5, 0.75, 0.25], [0.5, 0.5, 0.25, 0.75]]
    """
    h, w = x.shape[-2:]
    if size > h or size > w:
        raise ValueError(f"patch_size {size} is larger than the image size {(h, w)} (H, W)")
    sign = (2 * checkerboard(size) - 1).to(device=x.device, dtype=x.dtype)
    delta = torch.zeros(h, w, device=x.device, dtype=x.dtype)
    delta[h - size:, w - size:] = sign
    if all_corners:
        delta[:size, :size] = sign.flip(0).flip(1)
        delta[:size, w - size:] = sign.flip(0)
        delta[h - size:, :size] = sign.flip(1)
    return (x + amplitude * delta).clamp(0, 1)


def _check_budget(eps: Any, step_size: Any, steps: Any, steps_name: str = "steps") -> Tuple[float, float, int]:
    eps = check_positive_float(eps, "eps")
    step_size = check_positive_float(step_size, "step_size")
    steps = check_positive_int(steps, steps_name)
    if eps > 1:
        raise ValueError(f"eps must be in (0, 1] (an L-inf bound in pixel space [0, 1]), got {eps}")
    return eps, step_size, steps


@ATTACKS.register("label_consistent")
class LabelConsistent(FittedAttack):
    """Label-Consistent attack: PGD-hardened target-class images plus a corner trigger, labels kept.

    Paper: Turner, Tsipras & Madry, "Label-Consistent Backdoor Attacks" (2019). Threat model:
    clean-label data poisoning — the attacker may only perturb training images of the target
    class. Each poisoned image is first pushed away from its class by untargeted L∞ PGD on a
    surrogate (``eps`` = 8/255, ``steps`` = 100 of ``step_size`` = 1.5/255 by default, the paper's
    values), so the model cannot fit it from its content and leans on the trigger; then the
    checkerboard corner trigger is stamped (:func:`corner_trigger`, optionally in all four corners
    and at reduced ``amplitude``). Test images get the trigger only.

    The PGD images are per-sample: ``fit`` computes them for the poisoned indices in batches on
    the surrogate's device and stores them as ``uint8`` (``sample_images``), keyed by dataset index
    (``sample_index``). The paper's surrogate is adversarially trained; here it is a normally
    trained one (the small CNN trained by the attack unless ``surrogate`` is given).

    Args:
        eps: L∞ bound of the PGD perturbation, in ``(0, 1]``.
        step_size: PGD step, ``> 0``.
        steps: PGD steps, ``>= 1``.
        patch_size: side of the checkerboard trigger.
        amplitude: trigger amplitude in ``(0, 1]`` (1: full black/white).
        all_corners: stamp the trigger in all four corners.
        surrogate, surrogate_weights, surrogate_epochs, surrogate_samples, surrogate_width,
            batch_size, device, seed: see :class:`~lightning_backdoor.attacks.fitted.FittedAttack`.

    Example:
        >>> import torch
        >>> from torch.utils.data import TensorDataset
        >>> data = TensorDataset(torch.rand(16, 1, 8, 8), torch.arange(16) % 2)
        >>> lc = LabelConsistent(steps=2, surrogate_epochs=1, surrogate_width=4).fit(data, target=1)
        >>> lc.sample_index.tolist(), lc.sample_images.dtype
        ([1, 3, 5, 7, 9, 11, 13, 15], torch.uint8)
    """

    name = "label_consistent"
    dirty_label = False
    per_sample = True

    def __init__(self, eps: float = 8 / 255, step_size: float = 1.5 / 255, steps: int = 100, patch_size: int = 3,
                 amplitude: float = 1.0, all_corners: bool = False, surrogate: SurrogateSpec = None,
                 surrogate_weights: Optional[str] = None, surrogate_epochs: int = 2,
                 surrogate_samples: Optional[int] = 2000, surrogate_width: Optional[int] = None, batch_size: int = 256,
                 device: Optional[str] = None, seed: int = 0) -> None:
        super().__init__(surrogate, surrogate_weights, surrogate_epochs, surrogate_samples, surrogate_width,
                         batch_size, device, seed)
        self.eps, self.step_size, self.steps = _check_budget(eps, step_size, steps)
        self.patch_size = check_positive_int(patch_size, "patch_size")
        self.amplitude = check_positive_float(amplitude, "amplitude")
        if self.amplitude > 1:
            raise ValueError(f"amplitude must be in (0, 1], got {amplitude}")
        self.all_corners = check_bool(all_corners, "all_corners")

    def build(self, channels: int, height: int, width: int) -> "LabelConsistent":
        _check_image_shape(channels, height, width)
        if self.patch_size > min(height, width):
            raise ValueError(f"patch_size {self.patch_size} is larger than the image size {(height, width)} (H, W)")
        if self.sample_images is not None and tuple(self.sample_images.shape[1:]) != (channels, height, width):
            raise ValueError(f"the stored poisoned images are {tuple(self.sample_images.shape[1:])}, the data "
                             f"{(channels, height, width)}; fit a new LabelConsistent on this data")
        return self

    def apply_trigger(self, x: Tensor) -> Tensor:
        return corner_trigger(x, self.patch_size, self.amplitude, self.all_corners)

    def _fitted_state(self) -> bool:
        return self.sample_images is not None

    def _fit(self, dataset: Dataset, labels: Tensor, target: int, indices: Tensor, model: Optional[nn.Module],
             num_classes: int) -> None:
        self.__dict__["_fit_model"] = self.build_surrogate(dataset, labels, num_classes, model)
        self.__dict__["_fit_target"] = target

    def _train_images(self, x: Tensor, indices: Tensor) -> Tensor:
        net = self.__dict__["_fit_model"]
        y = torch.full((len(x),), self.__dict__["_fit_target"], dtype=torch.long)
        x_adv = ADV.pgd_untargeted(net, x, y, self.eps, self.step_size, self.steps, batch_size=self.batch_size)
        return self.apply_trigger(x_adv)

    def fit(self, dataset: Any, target: int, model: nn.Module | None = None, *, indices=None) -> "LabelConsistent":
        try:
            return super().fit(dataset, target, model, indices=indices)
        finally:
            self.__dict__.pop("_fit_model", None)

    def hparams(self) -> Dict[str, Any]:
        return {"eps": self.eps, "step_size": self.step_size, "steps": self.steps, "patch_size": self.patch_size,
                "amplitude": self.amplitude, "all_corners": self.all_corners, **self._common_hparams()}


class _UniversalPerturbation(FittedAttack):
    """A universal additive trigger ``x' = clip(x + m·δ)`` with ``δ`` fitted on a surrogate."""

    _lazy_buffers = FittedAttack._lazy_buffers + ("delta",)
    delta: Optional[Tensor]
    test_multiplier: float = 1.0

    def __init__(self, eps: float, step_size: float, epochs: int, samples: Optional[int], **kw: Any) -> None:
        super().__init__(**kw)
        self.eps, self.step_size, self.epochs = _check_budget(eps, step_size, epochs, "epochs")
        self.samples = None if samples is None else check_positive_int(samples, "samples")
        self.register_buffer("delta", None)

    def _fitted_state(self) -> bool:
        return self.delta is not None

    def build(self, channels: int, height: int, width: int) -> "_UniversalPerturbation":
        _check_image_shape(channels, height, width)
        if self.delta is not None and tuple(self.delta.shape) != (channels, height, width):
            raise ValueError(f"the fitted perturbation has shape {tuple(self.delta.shape)} but the images are "
                             f"{(channels, height, width)}; fit a new {type(self).__name__} on this data")
        return self

    def _add(self, x: Tensor, multiplier: float) -> Tensor:
        self._require_fitted("perturbation")
        if tuple(x.shape[-3:]) != tuple(self.delta.shape):
            raise ValueError(f"the fitted perturbation has shape {tuple(self.delta.shape)} but the images are "
                             f"{tuple(x.shape[-3:])}; fit a new {type(self).__name__} on this data")
        return (x + multiplier * self.delta.to(device=x.device, dtype=x.dtype)).clamp(0, 1)

    def apply_trigger(self, x: Tensor) -> Tensor:
        return self._add(x, self.test_multiplier)

    def apply_train_trigger(self, x: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
        """Training-time trigger ``clip(x + δ)`` (no test-time amplification)."""
        return self._add(x, 1.0)

    def _images(self, labels: Tensor, target: int) -> Tensor:
        raise NotImplementedError

    def _fit(self, dataset: Dataset, labels: Tensor, target: int, indices: Tensor, model: Optional[nn.Module],
             num_classes: int) -> None:
        net = self.build_surrogate(dataset, labels, num_classes, model)
        pool = self._images(labels, target)
        pool = pool[_seeded_subset(len(pool), self.samples, self.seed + 1)]
        images = dataset_images(dataset, pool)
        g = torch.Generator().manual_seed(self.seed)
        delta = ADV.universal_perturbation(net, images, target, self.eps, self.step_size, self.epochs,
                                           batch_size=min(self.batch_size, 128), generator=g)
        self.delta = delta.detach().cpu()
        others = torch.nonzero(labels != target).flatten()  # the surrogate's attack success on non-target images
        if len(others):
            xs = dataset_images(dataset, others[_seeded_subset(len(others), 256, self.seed + 2)])
            with evaluating(net):
                device = next(net.parameters()).device
                hit = net(self._add(xs, self.test_multiplier).to(device)).argmax(1).eq(target).float().mean()
            self.fit_info["surrogate_asr"] = float(hit)

    def _uap_hparams(self) -> Dict[str, Any]:
        return {"eps": self.eps, "step_size": self.step_size, "epochs": self.epochs, "samples": self.samples,
                **self._common_hparams()}


@ATTACKS.register("tuap")
class TUAP(_UniversalPerturbation):
    """TUAP: a targeted universal adversarial perturbation of a surrogate model as a clean-label trigger.

    The clean-label universal-perturbation attack as evaluated by SCALE-UP/IBD-PSC (after Zhao et
    al., "Clean-Label Backdoor Attacks on Video Recognition Models", CVPR 2020, which use a
    universal adversarial trigger). Threat model: clean-label data poisoning. ``fit`` computes one
    ``δ`` with ``‖δ‖∞ ≤ eps`` maximising the surrogate's probability of the target over a seeded
    subset of ``samples`` **non-target** training images (``epochs`` passes of signed-gradient
    steps of ``step_size``, projected; :func:`~lightning_backdoor.attacks.adversarial.universal_perturbation`);
    the trigger ``x' = clip(x + δ)`` is added to target-class training images (labels kept) and
    to every test image. ``δ`` is the ``delta`` buffer.

    Args:
        eps: L∞ bound of ``δ`` in ``(0, 1]``. Default 32/255, chosen on MNIST-5k (grey digits: at
            16/255 the surrogate's ASR was 0.10 and the victim's 0.80, at 32/255 0.73 and 0.97);
            8/255 is the usual CIFAR-10 budget (configs/cifar10/tuap_resnet18.yaml).
        step_size: signed-gradient step, ``> 0`` (2/255).
        epochs: passes over the images, ``>= 1``.
        samples: images the perturbation is fitted on (``None``: all non-target samples).
        surrogate, ...: see :class:`~lightning_backdoor.attacks.fitted.FittedAttack`.

    Example:
        >>> import torch
        >>> from torch.utils.data import TensorDataset
        >>> data = TensorDataset(torch.rand(16, 1, 8, 8), torch.arange(16) % 2)
        >>> tuap = TUAP(epochs=1, surrogate_epochs=1, surrogate_width=4).fit(data, target=1)
        >>> tuap.delta.shape, bool(tuap.delta.abs().max() <= tuap.eps + 1e-6)
        (torch.Size([1, 8, 8]), True)
    """

    name = "tuap"
    dirty_label = False

    def __init__(self, eps: float = 32 / 255, step_size: float = 2 / 255, epochs: int = 5,
                 samples: Optional[int] = 1000, surrogate: SurrogateSpec = None,
                 surrogate_weights: Optional[str] = None, surrogate_epochs: int = 2,
                 surrogate_samples: Optional[int] = 2000, surrogate_width: Optional[int] = None, batch_size: int = 256,
                 device: Optional[str] = None, seed: int = 0) -> None:
        super().__init__(eps, step_size, epochs, samples, surrogate=surrogate, surrogate_weights=surrogate_weights,
                         surrogate_epochs=surrogate_epochs, surrogate_samples=surrogate_samples,
                         surrogate_width=surrogate_width, batch_size=batch_size, device=device, seed=seed)

    def _images(self, labels: Tensor, target: int) -> Tensor:
        pool = torch.nonzero(labels != target).flatten()
        if len(pool) == 0:
            raise ValueError(f"tuap needs non-target samples to fit its perturbation; every label is {target}")
        return pool

    def hparams(self) -> Dict[str, Any]:
        return self._uap_hparams()


@ATTACKS.register("narcissus")
class Narcissus(_UniversalPerturbation):
    """NARCISSUS: a trigger optimised on target-class data to pull any input towards the target.

    Paper: Zeng, Pan, Just, Lyu & Jia, "Narcissus: A Practical Clean-Label Backdoor Attack with
    Limited Information" (CCS 2023). Threat model: clean-label data poisoning at very low poison
    rates; the attacker knows only target-class samples. ``fit`` solves
    ``δ = argmin_{‖δ‖∞ ≤ eps} Σ_{x ∈ target class} CE(f_sur(x + δ), t)`` by projected
    signed-gradient steps over a seeded subset of ``samples`` target-class training images;
    poisoned training images get ``clip(x + δ)``, test images the amplified ``clip(x +
    test_multiplier·δ)`` (×3 in the paper). The paper's surrogate is trained on out-of-distribution
    data and fine-tuned on the target class; here it is trained on the training set itself.

    Args:
        eps: L∞ bound of ``δ`` in ``(0, 1]`` (16/255, the paper's).
        step_size: signed-gradient step, ``> 0``.
        epochs: passes over the target-class images, ``>= 1``.
        samples: target-class images used (``None``: all).
        test_multiplier: test-time amplification of ``δ``, ``> 0`` (3 in the paper; 1: none).
        surrogate, ...: see :class:`~lightning_backdoor.attacks.fitted.FittedAttack`.

    Example:
        >>> import torch
        >>> from torch.utils.data import TensorDataset
        >>> data = TensorDataset(torch.rand(16, 1, 8, 8), torch.arange(16) % 2)
        >>> nar = Narcissus(epochs=2, surrogate_epochs=1, surrogate_width=4).fit(data, target=1)
        >>> x = torch.full((1, 8, 8), 0.5)
        >>> torch.allclose(nar(x), (x + 3 * nar.delta).clamp(0, 1)), torch.allclose(nar.train_trigger(x), x + nar.delta)
        (True, True)
    """

    name = "narcissus"
    dirty_label = False

    def __init__(self, eps: float = 16 / 255, step_size: float = 2 / 255, epochs: int = 30,
                 samples: Optional[int] = 500, test_multiplier: float = 3.0, surrogate: SurrogateSpec = None,
                 surrogate_weights: Optional[str] = None, surrogate_epochs: int = 2,
                 surrogate_samples: Optional[int] = 2000, surrogate_width: Optional[int] = None, batch_size: int = 256,
                 device: Optional[str] = None, seed: int = 0) -> None:
        super().__init__(eps, step_size, epochs, samples, surrogate=surrogate, surrogate_weights=surrogate_weights,
                         surrogate_epochs=surrogate_epochs, surrogate_samples=surrogate_samples,
                         surrogate_width=surrogate_width, batch_size=batch_size, device=device, seed=seed)
        self.test_multiplier = check_positive_float(test_multiplier, "test_multiplier")

    def _images(self, labels: Tensor, target: int) -> Tensor:
        return torch.nonzero(labels == target).flatten()

    def hparams(self) -> Dict[str, Any]:
        return {**self._uap_hparams(), "test_multiplier": self.test_multiplier}
