"""IAD: input-aware dynamic backdoor (Nguyen & Tran, NeurIPS 2020), a batch-level attack."""

from __future__ import annotations

from typing import Any, Callable, Dict, Iterable, List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..utils import evaluating
from ..validation import check_non_negative_float, check_positive_int, check_probability, check_seed
from .batch_base import BATCH_ATTACKS, AttackOptimizer, BatchAttack, PoisonedBatch, split_counts

OptimizerFactory = Callable[[Iterable], torch.optim.Optimizer]
SchedulerFactory = Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LRScheduler]


# -- functional core (torch only) ----------------------------------------------------------------
def iad_blend(x: Tensor, pattern: Tensor, mask: Tensor) -> Tensor:
    """``x' = x + mask * (pattern - x)``: a convex combination, so ``[0, 1]`` inputs stay in ``[0, 1]``.

    Example:
        >>> iad_blend(torch.zeros(1, 1, 1, 2), torch.ones(1, 1, 1, 2), torch.tensor([[[[0.25, 1.0]]]])).tolist()
        [[[[0.25, 1.0]]]]
    """
    return x + mask * (pattern - x)


def diversity_loss(x1: Tensor, x2: Tensor, out1: Tensor, out2: Tensor, eps: float = 1e-6) -> Tensor:
    """IAD's diversity term ``mean(||x1 - x2|| / ||out1 - out2||)`` over pairs of inputs and their generated
    patterns (or masks): small when different inputs get different triggers.

    Example:
        >>> a, b = torch.zeros(1, 1, 2, 2), torch.ones(1, 1, 2, 2)
        >>> round(float(diversity_loss(a, b, a, b * 0.5)), 4)
        2.0
    """
    dx = (x1 - x2).flatten(1).norm(dim=1)
    dp = (out1 - out2).flatten(1).norm(dim=1)
    return (dx / (dp + eps)).mean()


def mask_norm_loss(mask: Tensor, density: float) -> Tensor:
    """IAD's mask regulariser ``mean(relu(mask - density))``: pushes the mask below ``density`` per pixel."""
    return F.relu(mask - density).mean()


class IADGenerator(nn.Module):
    """A small conv encoder-decoder (two stride-2 downsamplings, two nearest upsamplings) ending in a sigmoid.

    Output ``[N, out_channels, H, W]`` in ``[0, 1]`` for any ``H, W`` (resized back when odd sizes round).

    Example:
        >>> IADGenerator(3, 1, hidden=4)(torch.rand(2, 3, 28, 28)).shape
        torch.Size([2, 1, 28, 28])
    """

    def __init__(self, in_channels: int, out_channels: int, hidden: int = 16) -> None:
        super().__init__()
        h = hidden

        def block(i: int, o: int, stride: int = 1) -> List[nn.Module]:
            return [nn.Conv2d(i, o, 3, stride=stride, padding=1), nn.BatchNorm2d(o), nn.ReLU()]

        self.encoder = nn.Sequential(*block(in_channels, h), *block(h, 2 * h, 2), *block(2 * h, 2 * h, 2))
        self.decoder = nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), *block(2 * h, h),
                                     nn.Upsample(scale_factor=2, mode="nearest"), *block(h, h),
                                     nn.Conv2d(h, out_channels, 3, padding=1))

    def forward(self, x: Tensor) -> Tensor:
        out = self.decoder(self.encoder(x))
        if out.shape[-2:] != x.shape[-2:]:
            out = F.interpolate(out, size=tuple(x.shape[-2:]), mode="bilinear", align_corners=False)
        return torch.sigmoid(out)


def _check_generated(out: Any, x: Tensor, name: str, channels: tuple) -> Tensor:
    if not isinstance(out, Tensor) or out.dim() != 4 or out.shape[0] != x.shape[0] or out.shape[-2:] != x.shape[-2:] \
            or out.shape[1] not in channels:
        shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        want = " or ".join(f"[{x.shape[0]}, {c}, {x.shape[2]}, {x.shape[3]}]" for c in channels)
        raise ValueError(f"{name} must return a tensor shaped like its input {tuple(x.shape)}: expected {want}, "
                         f"got {shape}")
    return out


@BATCH_ATTACKS.register("iad")
class IAD(BatchAttack):
    """Input-aware dynamic backdoor: a pattern generator ``G`` and a mask generator ``M`` make a different
    trigger per input, ``x' = x + M(x) * (G(x) - x)``, trained jointly with the classifier.

    Paper: Nguyen & Tran, "Input-Aware Dynamic Backdoor Attack" (NeurIPS 2020). Threat model: the
    attacker controls training (dirty-label, training-time attack with a trained trigger generator).

    Training, per batch (on the device, :meth:`poison_batch`): the first ``backdoor_share`` of the batch
    gets its own trigger and the target label; the next ``cross_share`` gets the trigger generated from
    *another* input of the batch (its neighbour in the batch, ``roll`` by one) and keeps its true label
    (the cross-trigger term: a trigger only works on the input it was made for); the rest stays clean.
    ``G`` also minimises ``lambda_div * ||x - x''|| / ||G(x) - G(x'')||`` (diversity). The mask generator
    is pre-trained alone for ``mask_pretrain_steps`` steps on ``lambda_div * diversity(M) + lambda_norm *
    mean(relu(M(x) - mask_density))`` and then frozen (eval mode, no gradients), as in the paper.
    Optimisers: ``G`` with ``optimizer``/``scheduler`` in the training phase, ``M`` with ``mask_optimizer``
    in the pre-training phase; the classifier has its own (``BackdoorClassifier(optimizer=...)``).

    Args:
        backdoor_share: share of each batch triggered and relabelled (paper: 0.1).
        cross_share: share of each batch with another input's trigger and the true label (paper: 0.1);
            ``backdoor_share + cross_share`` must be < 1.
        lambda_div: weight of the diversity loss (paper: 1).
        lambda_norm: weight of the mask-density regulariser (paper: 100).
        mask_density: target mask density (paper: 0.032).
        mask_pretrain_steps: training steps spent pre-training ``M`` (the classifier waits); 0: none.
        hidden: width of the default generators.
        optimizer / scheduler: of ``G`` (default ``Adam(lr=0.01, betas=(0.5, 0.9))``, no schedule;
            schedulers are stepped once per epoch).
        mask_optimizer: of ``M`` (default ``Adam(lr=0.01, betas=(0.5, 0.9))``).
        pattern_generator / mask_generator: your own modules ``[N, C, H, W] -> [N, C, H, W]`` (pattern) /
            ``[N, 1 or C, H, W]`` (mask), values in ``[0, 1]``; default :class:`IADGenerator`.
        seed: seeds the generators' initial weights (a forked RNG: the global stream is untouched).

    Example:
        >>> attack = IAD(hidden=4).build(1, 8, 8)
        >>> out = attack.poison_batch(torch.rand(10, 1, 8, 8), torch.arange(10), target=0)
        >>> out.y.tolist(), int(out.poisoned.sum()), int(out.cross.sum())
        ([0, 1, 2, 3, 4, 5, 6, 7, 8, 9], 1, 1)
        >>> attack.trigger(torch.rand(3, 1, 8, 8)).shape
        torch.Size([3, 1, 8, 8])
    """

    name = "iad"
    steps: Tensor

    def __init__(
        self,
        backdoor_share: float = 0.1,
        cross_share: float = 0.1,
        lambda_div: float = 1.0,
        lambda_norm: float = 100.0,
        mask_density: float = 0.032,
        mask_pretrain_steps: int = 200,
        hidden: int = 16,
        optimizer: Optional[OptimizerFactory] = None,
        scheduler: Optional[SchedulerFactory] = None,
        mask_optimizer: Optional[OptimizerFactory] = None,
        pattern_generator: Optional[nn.Module] = None,
        mask_generator: Optional[nn.Module] = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.backdoor_share = check_probability(backdoor_share, "backdoor_share", low_open=True, high_open=True)
        self.cross_share = check_probability(cross_share, "cross_share", high_open=True)
        if self.backdoor_share + self.cross_share >= 1:
            raise ValueError(f"backdoor_share + cross_share must be < 1 (some clean samples per batch), got "
                             f"backdoor_share={backdoor_share} + cross_share={cross_share} = "
                             f"{self.backdoor_share + self.cross_share:g}; the paper uses 0.1 + 0.1")
        self.lambda_div = check_non_negative_float(lambda_div, "lambda_div")
        self.lambda_norm = check_non_negative_float(lambda_norm, "lambda_norm")
        self.mask_density = check_probability(mask_density, "mask_density", low_open=True)
        self.mask_pretrain_steps = check_positive_int(mask_pretrain_steps, "mask_pretrain_steps", allow_zero=True)
        self.hidden = check_positive_int(hidden, "hidden")
        for name, m in (("pattern_generator", pattern_generator), ("mask_generator", mask_generator)):
            if m is not None and not isinstance(m, nn.Module):
                raise TypeError(f"{name} must be a torch.nn.Module or None, got {type(m).__name__}")
        for name, f in (("optimizer", optimizer), ("scheduler", scheduler), ("mask_optimizer", mask_optimizer)):
            if f is not None and not callable(f):
                raise TypeError(f"{name} must be a callable (e.g. torch.optim.Adam / a LightningCLI class_path) or None, "
                                f"got {type(f).__name__}")
        self.optimizer_factory, self.scheduler_factory, self.mask_optimizer_factory = optimizer, scheduler, mask_optimizer
        self.pattern_generator = pattern_generator
        self.mask_generator = mask_generator
        self.seed = check_seed(seed)
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        self.register_buffer("image_shape", None)

    # -- building --------------------------------------------------------------------------------
    def build(self, channels: int, height: int, width: int) -> "IAD":
        if self.pattern_generator is None or self.mask_generator is None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.seed)
                if self.pattern_generator is None:
                    self.pattern_generator = IADGenerator(channels, channels, self.hidden)
                if self.mask_generator is None:
                    self.mask_generator = IADGenerator(channels, 1, self.hidden)
        if self.image_shape is None:
            self.image_shape = torch.tensor([channels, height, width], dtype=torch.long)
        return self

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        shape = state_dict.get(prefix + "image_shape")
        if isinstance(shape, Tensor) and (self.pattern_generator is None or self.mask_generator is None):
            self.build(*[int(v) for v in shape.tolist()])  # a fresh instance adopts the checkpoint's generators
        if isinstance(shape, Tensor) and self.image_shape is None:
            self.image_shape = shape.detach().clone()
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def _require_built(self) -> None:
        if self.pattern_generator is None or self.mask_generator is None:
            raise RuntimeError("IAD has no generators yet: call build(channels, height, width) first (the data module "
                               "does it in setup)")

    # -- the trigger -----------------------------------------------------------------------------
    def _pattern(self, x: Tensor) -> Tensor:
        return _check_generated(self.pattern_generator(x), x, "pattern_generator", (x.shape[1],))

    def _mask(self, x: Tensor) -> Tensor:
        return _check_generated(self.mask_generator(x), x, "mask_generator", tuple(sorted({1, x.shape[1]})))

    def _frozen_mask(self, x: Tensor) -> Tensor:
        with evaluating(self.mask_generator):  # pre-trained, then fixed: eval mode, no gradients
            return self._mask(x)

    def apply_trigger(self, x: Tensor) -> Tensor:
        self._require_built()
        return iad_blend(x, self._pattern(x), self._frozen_mask(x))

    def poison_batch(self, x: Tensor, y: Tensor, target: int) -> PoisonedBatch:
        self._require_built()
        n = len(x)
        n_bd, n_cross = split_counts(n, self.backdoor_share, self.cross_share)
        idx = torch.arange(n, device=x.device)
        partner = torch.roll(idx, -1)  # another input of the batch for the cross samples
        x_bd = x[:n_bd]
        cross_idx = idx[n_bd:n_bd + n_cross]
        x_src = x[partner[cross_idx]]
        patterns = self._pattern(torch.cat([x_bd, x_src]))
        masks = self._frozen_mask(torch.cat([x_bd, x_src]))
        p_bd, p_src = patterns[:n_bd], patterns[n_bd:]
        xp_bd = iad_blend(x_bd, p_bd, masks[:n_bd])
        xp_cross = iad_blend(x[cross_idx], p_src, masks[n_bd:])
        xp = torch.cat([xp_bd, xp_cross, x[n_bd + n_cross:]])
        yp = torch.cat([torch.full_like(y[:n_bd], int(target)), y[n_bd:]])
        poisoned = idx < n_bd
        cross = (idx >= n_bd) & (idx < n_bd + n_cross)
        extras: Dict[str, Tensor] = {}
        k = min(n_bd, n_cross)
        if k and self.lambda_div > 0:
            extras["diversity"] = diversity_loss(x_bd[:k], x_src[:k], p_bd[:k], p_src[:k])
        return PoisonedBatch(xp, yp, poisoned, cross, extras)

    def attack_loss(self, x: Tensor, y: Tensor, batch: PoisonedBatch) -> Optional[Tensor]:
        div = batch.extras.get("diversity")
        return None if div is None else self.lambda_div * div

    # -- optimisation ----------------------------------------------------------------------------
    def phase(self) -> str:
        return "pretrain" if int(self.steps) < self.mask_pretrain_steps else "train"

    def pretrain_loss(self, x: Tensor, y: Tensor) -> Tensor:
        self._require_built()
        x2 = torch.roll(x, -1, dims=0)
        m1, m2 = self._mask(x), self._mask(x2)
        loss = self.lambda_norm * mask_norm_loss(m1, self.mask_density)
        if self.lambda_div > 0 and len(x) > 1:
            loss = loss + self.lambda_div * diversity_loss(x, x2, m1, m2)
        return loss

    def configure_optimizers(self) -> List[AttackOptimizer]:
        self._require_built()

        def adam(params):
            return torch.optim.Adam(params, lr=0.01, betas=(0.5, 0.9))

        g_opt = (self.optimizer_factory or adam)(self.pattern_generator.parameters())
        sched = self.scheduler_factory(g_opt) if self.scheduler_factory is not None else None
        m_opt = (self.mask_optimizer_factory or adam)(self.mask_generator.parameters())
        out = [AttackOptimizer("generator", g_opt, sched, "train")]
        if self.mask_pretrain_steps > 0:
            out.append(AttackOptimizer("mask", m_opt, None, "pretrain"))
        return out

    def step_done(self, phase: str) -> None:
        self.steps += 1

    def hparams(self) -> Dict[str, Any]:
        return {"backdoor_share": self.backdoor_share, "cross_share": self.cross_share, "lambda_div": self.lambda_div,
                "lambda_norm": self.lambda_norm, "mask_density": self.mask_density,
                "mask_pretrain_steps": self.mask_pretrain_steps, "hidden": self.hidden, "seed": self.seed}
