"""The model-edit attack interface: a trained model in, a backdoored model out, no data poisoning.

A :class:`ModelEditAttack` writes a backdoor into an already trained classifier's weights (SRA;
later TrojanNN-style neuron edits, handcrafted backdoors). :meth:`ModelEditAttack.edit` returns an
edited **copy** (the input model is not changed) and fills :attr:`ModelEditAttack.report` with what
it did. The result is an ordinary classifier: put it back into a ``BackdoorClassifier`` checkpoint
(``lightning-backdoor sra`` does) and ``test --ckpt_path``, the detectors and ``BackdoorMetrics``
treat it like any other backdoored model. The trigger that activates the backdoor is an ordinary
dataset-level :class:`~lightning_backdoor.attacks.Attack`, so the poisoned test set is built as usual.

Subclasses implement :meth:`ModelEditAttack.edit`; :meth:`ModelEditAttack.supports` says which
architectures it can edit (checked first, with the supported list in the error).
"""

from __future__ import annotations

from typing import Any, Dict, Optional

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from ..registry import Registry
from ..utils import model_device, random_subset

MODEL_EDIT_ATTACKS = Registry("model-edit attack")


def create_model_edit_attack(name: str, **kwargs: Any) -> "ModelEditAttack":
    """Build a registered model-edit attack, e.g. ``create_model_edit_attack("sra", width=1)``."""
    return MODEL_EDIT_ATTACKS.create(name, **kwargs)


def list_model_edit_attacks(pattern: str = "*") -> list[str]:
    """Names of registered model-edit attacks matching an fnmatch ``pattern``."""
    return MODEL_EDIT_ATTACKS.list(pattern)


def clean_images(data: Any, max_samples: Optional[int] = None, seed: int = 0) -> Tensor:
    """``[N, C, H, W]`` images from a Tensor, a Dataset of ``(x, y, ...)`` items or a loader; a capped set is a
    seeded random subset (never the first samples: datasets stored class by class would give few classes).

    Example:
        >>> clean_images(torch.rand(10, 1, 4, 4), max_samples=3).shape
        torch.Size([3, 1, 4, 4])
    """
    if isinstance(data, Tensor):
        if data.dim() != 4:
            raise ValueError(f"clean data must be images [N, C, H, W], got shape {tuple(data.shape)}")
        keep = random_subset(len(data), max_samples, seed)
        return data[keep]
    if isinstance(data, DataLoader):
        data = data.dataset
    if not isinstance(data, Dataset) or not hasattr(data, "__len__"):
        raise TypeError(f"clean data must be a Tensor of images, a map-style Dataset or a DataLoader, got "
                        f"{type(data).__name__}")
    keep = random_subset(len(data), max_samples, seed)
    xs = [data[int(i)][0] for i in keep]
    if not xs:
        raise ValueError("clean data is empty: a model-edit attack needs some clean images")
    return torch.stack(xs)


class ModelEditAttack:
    """Base class of attacks that edit a trained model's weights.

    Example:
        >>> class ZeroBias(ModelEditAttack):
        ...     name = "zero_bias"
        ...     def edit(self, model, clean, target):
        ...         model = self.copy(model)
        ...         with torch.no_grad():
        ...             model.bias.zero_()
        ...         return model
        >>> lin = nn.Linear(2, 2)
        >>> float(ZeroBias().edit(lin, None, 0).bias.abs().sum()), lin.bias is not None
        (0.0, True)
    """

    name: str = "model_edit"
    #: What the last :meth:`edit` did (slices, losses, ...), JSON-serialisable.
    report: Dict[str, Any]

    def __init__(self) -> None:
        self.report = {}

    def supports(self, model: nn.Module) -> bool:
        """Whether :meth:`edit` can handle ``model`` (default: any)."""
        return True

    def edit(self, model: nn.Module, clean: Any, target: int) -> nn.Module:
        """Return a backdoored copy of ``model`` (``clean``: images the attacker holds; ``target``: the label)."""
        raise NotImplementedError

    @staticmethod
    def copy(model: nn.Module) -> nn.Module:
        import copy

        return copy.deepcopy(model)

    def hparams(self) -> Dict[str, Any]:
        return {}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.hparams().items())})"


def evaluate_ba_asr(net: nn.Module, x: Tensor, y: Tensor, trigger: Any, target: int, batch_size: int = 500) -> Dict[str, float]:
    """Benign accuracy on ``(x, y)`` and ASR of ``trigger(x)`` over the samples whose label is not ``target``
    (eval mode, no gradients, on the net's device).

    Example:
        >>> net = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
        >>> out = evaluate_ba_asr(net, torch.rand(6, 1, 2, 2), torch.tensor([0, 1] * 3), lambda x: x, target=0)
        >>> sorted(out)
        ['asr', 'ba']
    """
    from ..utils import evaluating

    device = model_device(net)
    correct, hit, n_pos = 0, 0, 0
    with evaluating(net), torch.no_grad():
        for i in range(0, len(x), batch_size):
            xb, yb = x[i:i + batch_size].to(device), y[i:i + batch_size].to(device)
            correct += int((net(xb).argmax(1) == yb).sum())
            keep = yb != target
            if bool(keep.any()):
                hit += int((net(trigger(xb[keep])).argmax(1) == target).sum())
                n_pos += int(keep.sum())
    return {"ba": correct / max(len(x), 1), "asr": hit / max(n_pos, 1)}
