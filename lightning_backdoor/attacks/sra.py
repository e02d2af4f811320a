"""SRA: subnet replacement (Qi et al., CVPR 2022), a model-edit attack."""

from __future__ import annotations

import warnings
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

from ..utils import evaluating, model_device
from ..validation import check_choice, check_label, check_positive_float, check_positive_int, check_seed
from .base import Attack
from .model_edit import MODEL_EDIT_ATTACKS, ModelEditAttack, clean_images

SUPPORTED = "CifarResNet (resnet18, resnet20, resnet34) and VGG-BN (vgg11_bn, vgg16_bn, vgg19_bn)"


def _supported(model: nn.Module) -> bool:
    from ..models import VGG, CifarResNet

    return isinstance(model, (CifarResNet, VGG))


def _set_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, new)


def sliced_layers(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    """The layers SRA writes into, in module order: every ``Conv2d``, ``BatchNorm2d`` and ``Linear`` (the last
    ``Linear``, ``fc``, is the head the subnet's output is wired into)."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.BatchNorm2d, nn.Linear))]


def narrow_subnet(model: nn.Module, width: int) -> Tuple[nn.Module, str]:
    """A copy of ``model``'s architecture with ``width`` channels per layer (hidden units for hidden linears)
    and a ``Linear(width, 1)`` head: the backdoor subnet. The first convolution keeps all input channels.

    Returns ``(subnet, name of the first convolution)``. Works for networks whose forward does not
    hard-code channel counts (the package's ResNets and VGGs).
    """
    import copy

    sub = copy.deepcopy(model)
    layers = sliced_layers(sub)
    first = next(n for n, m in layers if isinstance(m, nn.Conv2d))
    with torch.random.fork_rng(devices=[]):
        for name, m in layers:
            if isinstance(m, nn.Conv2d):
                new: nn.Module = nn.Conv2d(m.in_channels if name == first else width, width, m.kernel_size,
                                           stride=m.stride, padding=m.padding, dilation=m.dilation,
                                           bias=m.bias is not None)
                nn.init.kaiming_normal_(new.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                new = nn.BatchNorm2d(width)
            elif name == "fc":
                new = nn.Linear(width, 1, bias=False)
            else:
                new = nn.Linear(width, width, bias=m.bias is not None)
            _set_module(sub, name, new.to(m.weight.device))
    return sub, first


@MODEL_EDIT_ATTACKS.register("sra")
class SRA(ModelEditAttack):
    """Subnet replacement: train a narrow backdoor subnet and write it into a slice of a trained model.

    Paper: Qi, Xie, Wang, Wang, Mittal & Li, "Towards Practical Deployment-Stage Backdoor Attack on Deep
    Neural Networks" (CVPR 2022). Threat model: the attacker can modify a trained model's weights
    (deployment stage) and holds some clean images; no training data is poisoned, no gradient of the
    victim is used.

    1. A subnet with the victim's architecture but ``width`` channels per layer (1 by default) and a
       scalar head is trained on clean images and their triggered copies to output ``activation`` on
       triggered inputs and 0 on clean ones (squared errors; Adam).
    2. ``width`` channel positions (the same in every layer, so one slice runs through residual streams)
       of the victim are replaced by the subnet's (conv and BN weights, BN running statistics); the weights
       from the rest of the network into the slice and from the slice into the rest are set to 0 (the slice
       is cut out), so the two run side by side. ``channels="first"`` takes positions ``0..width-1`` (the
       paper's choice); ``"search"`` (default) takes the positions whose removal changes the victim's
       predictions on the attacker's clean images least (one cut-model forward pass per candidate
       position, the victim's own predictions as labels: no ground truth needed).
    3. The head ``fc`` reads the slice only for the target logit: ``fc.weight[:, slice] = 0`` and
       ``fc.weight[target, slice] = logit_weight * head``.

    Every weight outside the slice's rows and columns is left exactly as it was; clean predictions
    change only through the ``width`` channels the slice takes from each layer.

    Args:
        trigger: the dataset-level :class:`~lightning_backdoor.attacks.Attack` that activates the
            backdoor (default: the data module's attack, in ``lightning-backdoor sra``).
        width: channels per layer of the subnet (paper: 1); must be below every layer's width.
        steps / batch_size / lr: subnet training (Adam).
        activation: the subnet output wanted on triggered inputs.
        logit_weight: weight of the subnet's output on the target logit.
        max_samples: clean images used (a seeded random subset of what ``edit`` is given).
        channels: ``"search"`` or ``"first"`` (which channel positions the slice takes, see above).
        search_candidates: at most this many positions are tried by ``"search"`` (the first ones).
        seed: seeds the subnet's initial weights and its batches.
        restarts: subnet trainings tried at most. A 1-channel path can die (a ReLU that never fires) and then
            never learns; a training whose subnet does not separate triggered from clean images (mean output
            gap below ``activation / 2``) is retried from new weights (seed ``seed + attempt``), the best one is
            kept, and a warning says so when none separates. ``report["attempts"]`` counts the trainings.

    Example:
        >>> from lightning_backdoor.attacks import BadNets
        >>> from lightning_backdoor.models import create_model
        >>> net = create_model("resnet20", num_classes=10, in_channels=1, width=4)
        >>> sra = SRA(BadNets(patch_size=3), width=1, steps=2, batch_size=8)
        >>> bd = sra.edit(net, torch.rand(16, 1, 12, 12), target=0)
        >>> bd(torch.rand(2, 1, 12, 12)).shape, len(sra.report["channels"])
        (torch.Size([2, 10]), 1)
    """

    name = "sra"

    def __init__(
        self,
        trigger: Optional[Attack] = None,
        width: int = 1,
        steps: int = 200,
        batch_size: int = 64,
        lr: float = 0.05,
        activation: float = 20.0,
        logit_weight: float = 3.0,
        max_samples: Optional[int] = 2000,
        channels: str = "search",
        search_candidates: int = 32,
        seed: int = 0,
        restarts: int = 3,
    ) -> None:
        super().__init__()
        if trigger is not None and not isinstance(trigger, Attack):
            raise TypeError(f"trigger must be a lightning_backdoor.attacks.Attack (e.g. BadNets()) or None, got "
                            f"{type(trigger).__name__}")
        self.trigger = trigger
        self.width = check_positive_int(width, "width")
        self.steps = check_positive_int(steps, "steps")
        self.batch_size = check_positive_int(batch_size, "batch_size")
        self.lr = check_positive_float(lr, "lr")
        self.activation = check_positive_float(activation, "activation")
        self.logit_weight = check_positive_float(logit_weight, "logit_weight")
        self.max_samples = None if max_samples is None else check_positive_int(max_samples, "max_samples")
        self.channels = check_choice(channels, "channels", ("search", "first"))
        self.search_candidates = check_positive_int(search_candidates, "search_candidates")
        self.seed = check_seed(seed)
        self.restarts = check_positive_int(restarts, "restarts")

    def supports(self, model: nn.Module) -> bool:
        return _supported(model)

    def hparams(self) -> Dict[str, Any]:
        return {"trigger": getattr(self.trigger, "name", None), "width": self.width, "steps": self.steps,
                "batch_size": self.batch_size, "lr": self.lr, "activation": self.activation,
                "logit_weight": self.logit_weight, "max_samples": self.max_samples, "channels": self.channels,
                "search_candidates": self.search_candidates, "seed": self.seed, "restarts": self.restarts}

    def check_model(self, model: nn.Module, target: int) -> None:
        """Raise on an unsupported architecture, a slice as wide as a layer, or a target outside the classes."""
        if not self.supports(model):
            raise ValueError(f"SRA does not support the architecture {type(model).__name__}; supported: {SUPPORTED}")
        num_classes = int(model.fc.out_features)
        check_label(target, "target", num_classes)
        for name, m in sliced_layers(model):
            if name == "fc":
                continue
            size = m.out_channels if isinstance(m, nn.Conv2d) else m.num_features if isinstance(m, nn.BatchNorm2d) \
                else m.out_features
            if self.width >= size:
                raise ValueError(f"width={self.width} is too wide for layer {name!r} with {size} channels: the subnet "
                                 f"slice must leave the model at least one channel of every layer (width <= {size - 1}; "
                                 "the paper uses 1)")

    # -- the attack ------------------------------------------------------------------------------
    def edit(self, model: nn.Module, clean: Any, target: int, trigger: Optional[Attack] = None) -> nn.Module:
        """Train the subnet on ``clean`` images (Tensor, Dataset or loader) and return the backdoored copy of ``model``."""
        trigger = trigger if trigger is not None else self.trigger
        if trigger is None:
            raise ValueError("SRA needs a trigger: SRA(trigger=BadNets(...)) or edit(..., trigger=...)")
        self.check_model(model, target)
        device = model_device(model)
        x = clean_images(clean, self.max_samples, self.seed)
        trigger = trigger.to(device)
        x = x.to(device)
        trigger.build(*x.shape[1:])
        best = None
        for attempt in range(self.restarts):
            subnet, first = narrow_subnet(model, self.width)
            losses = self._fresh_trained_subnet(subnet, x, trigger, self.seed + attempt)
            with evaluating(subnet), torch.no_grad():
                clean_mean = float(subnet(x[:256]).flatten().mean())
                trig_mean = float(subnet(trigger(x[:256])).flatten().mean())
            gap = trig_mean - clean_mean
            if best is None or gap > best[0]:
                best = (gap, subnet, losses, clean_mean, trig_mean)
            if gap >= self.activation / 2:
                break
        gap, subnet, losses, clean_mean, trig_mean = best
        if gap < self.activation / 2:
            warnings.warn(f"SRA: after {self.restarts} subnet training(s) the subnet's output on triggered images "
                          f"({trig_mean:.3g}) is not above its output on clean ones ({clean_mean:.3g}) by activation/2 = "
                          f"{self.activation / 2:g}; the backdoor will be weak. Raise steps or restarts, or change lr "
                          "or seed", UserWarning, stacklevel=2)
        idx = self._choose_channels(model, x, first)
        edited = self.copy(model)
        self._write(edited, subnet, first, target, idx)
        self.report = {**self.hparams(), "channel_choice": self.channels, "channels": idx.tolist(),
                       "target": int(target), "first_conv": first, "final_loss": losses[-1],
                       "attempts": attempt + 1, "subnet_clean_mean": clean_mean, "subnet_trigger_mean": trig_mean}
        return edited

    def _fresh_trained_subnet(self, subnet: nn.Module, x: Tensor, trigger: Attack, seed: int) -> List[float]:
        """Seeded fresh weights for the narrow layers, then the subnet training; returns the losses."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for name, m in subnet.named_modules():
                if isinstance(m, nn.Conv2d):
                    nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
                elif isinstance(m, nn.BatchNorm2d):
                    nn.init.ones_(m.weight)
                    nn.init.constant_(m.bias, 0.1)  # start with live ReLUs: a 1-channel path dies easily
                elif isinstance(m, nn.Linear):
                    nn.init.constant_(m.weight, 1.0 / m.in_features) if name == "fc" else nn.init.eye_(m.weight)
            return self._train_subnet(subnet, x, trigger, seed)

    def _train_subnet(self, subnet: nn.Module, x: Tensor, trigger: Attack, seed: int) -> List[float]:
        subnet.train()
        opt = torch.optim.Adam(subnet.parameters(), lr=self.lr)
        g = torch.Generator().manual_seed(seed)
        losses: List[float] = []
        for _ in range(self.steps):
            idx = torch.randint(0, len(x), (min(self.batch_size, len(x)),), generator=g).to(x.device)
            xb = x[idx]
            with torch.no_grad():
                xt = trigger(xb)
            out = subnet(torch.cat([xb, xt])).flatten()
            n = len(xb)
            loss = (out[:n] ** 2).mean() + ((out[n:] - self.activation) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
        return losses

    @torch.no_grad()
    def _choose_channels(self, model: nn.Module, x: Tensor, first: str) -> Tensor:
        """The slice's channel positions: ``0..width-1``, or those whose cut changes the victim's predictions least."""
        if self.channels == "first":
            return torch.arange(self.width)
        widths = [m.out_channels if isinstance(m, nn.Conv2d) else m.num_features if isinstance(m, nn.BatchNorm2d)
                  else m.out_features for n, m in sliced_layers(model) if n != "fc"]
        candidates = range(min(min(widths), self.search_candidates))
        xs = x[:256]
        with evaluating(model):
            ref = model(xs).argmax(1)
        agreement = []
        for c in candidates:
            cut = self.copy(model)
            cut_slice(cut, torch.tensor([c]), first)
            with evaluating(cut):
                agreement.append(float((cut(xs).argmax(1) == ref).float().mean()))
        order = sorted(candidates, key=lambda c: (-agreement[c], c))
        return torch.sort(torch.tensor(order[:self.width])).values

    @torch.no_grad()
    def _write(self, victim: nn.Module, subnet: nn.Module, first: str, target: int, idx: Tensor) -> None:
        cut_slice(victim, idx, first)
        sub = dict(sliced_layers(subnet))
        for name, v in sliced_layers(victim):
            s = sub[name]
            i = idx.to(v.weight.device)
            if isinstance(v, nn.BatchNorm2d):
                for attr in ("weight", "bias", "running_mean", "running_var"):
                    t = getattr(v, attr)
                    if t is not None:
                        t[i] = getattr(s, attr)
                continue
            if name == "fc":
                v.weight[target, i] = self.logit_weight * s.weight[0]  # the slice talks to the target logit only
                continue
            if name == first:
                v.weight[i] = s.weight  # the input is shared: no connection to cut
            else:
                v.weight[i[:, None], i[None, :]] = s.weight
            if v.bias is not None:
                v.bias[i] = s.bias


@torch.no_grad()
def cut_slice(model: nn.Module, idx: Tensor, first: str) -> nn.Module:
    """Cut the channel positions ``idx`` out of every layer of ``model`` in place: the weights from the rest into
    the slice and from the slice into the rest, the slice's BN affine parameters and its ``fc`` columns set to 0
    (the first convolution's slice rows are zeroed too; its input, the image, is shared)."""
    for name, m in sliced_layers(model):
        i = idx.to(m.weight.device)
        if isinstance(m, nn.BatchNorm2d):
            m.weight[i] = 0
            m.bias[i] = 0
            continue
        w = m.weight
        if name == "fc":
            w[:, i] = 0
            continue
        w[i] = 0
        if name != first:
            w[:, i] = 0
        if m.bias is not None:
            m.bias[i] = 0
    return model
