"""BaDExpert: backdoor-expert extraction and scoring, in pure torch (no Lightning).

Xie et al., "BaDExpert: Extracting Backdoor Functionality for Accurate Backdoor Input Detection",
ICLR 2024. White-box, data-limited (docs/methods.md §4).

- The **backdoor expert** ``B``: a copy of the model fine-tuned on a few benign samples whose labels
  are deliberately wrong. It forgets the normal task but keeps the backdoor, so it still agrees with
  the original prediction ``ŷ`` on triggered inputs only.
- The **auxiliary model** ``M'``: a copy fine-tuned on the same samples with their true labels, which
  weakens the backdoor and keeps the normal task.

Both are stored as plain tensors (their ``state_dict``) and run through the *user's* model with
``torch.func.functional_call``, so no copy of the model is kept and the model is never modified.

    mislabelled = wrong_labels(y, num_classes, "shift")               # (y + 1) mod K
    expert = finetune_copy(model, x, mislabelled, epochs=5, lr=0.01)  # {name: tensor}
    b = confidence_in(model, expert, x_test, pred)                    # B(ŷ | x)
    score = combine(b, a, "ratio")                                    # log B(ŷ|x) - log M'(ŷ|x)
"""

from __future__ import annotations

import copy
from typing import Dict, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from ...utils import evaluating, preserved_rng

BADEXPERT_RULES = ("ratio", "triangle", "expert")
WRONG_LABELS = ("shift", "random")


def wrong_labels(y: Tensor, num_classes: int, mode: str = "shift", generator: torch.Generator | None = None) -> Tensor:
    """A label different from ``y`` for every sample: ``(y + 1) mod K`` (``"shift"``) or uniform among the
    other ``K - 1`` classes (``"random"``, drawn from ``generator``)."""
    if num_classes < 2:
        raise ValueError(f"BaDExpert needs a model with at least 2 classes to mislabel samples, got {num_classes}")
    y = y.long()
    if mode == "shift":
        return (y + 1) % num_classes
    if mode == "random":
        offset = torch.randint(1, num_classes, y.shape, generator=generator).to(y.device)
        return (y + offset) % num_classes
    raise ValueError(f"wrong_labels must be one of {list(WRONG_LABELS)}, got {mode!r}")


def trainable_parameters(model: nn.Module) -> int:
    """Number of parameter tensors of ``model`` with ``requires_grad``."""
    return sum(1 for p in model.parameters() if p.requires_grad)


def finetune_copy(
    model: nn.Module, x: Tensor, y: Tensor, *, epochs: int, lr: float, batch_size: int = 64, momentum: float = 0.9,
    weight_decay: float = 0.0, seed: int = 0,
) -> Dict[str, Tensor]:
    """Fine-tune a deep copy of ``model`` on ``(x, y)`` (SGD, train mode) and return its ``state_dict`` tensors.

    The model itself (mode, parameters, buffers, gradients) and the caller's global RNG are untouched;
    batch order and any dropout follow ``seed``. Only the parameters with ``requires_grad`` are trained.
    """
    if trainable_parameters(model) == 0:
        raise ValueError("BaDExpert fine-tunes copies of the model, but the model has no trainable parameters "
                         "(every parameter has requires_grad=False); unfreeze the layers to fine-tune")
    device = x.device
    # a detection callback fits inside Lightning's test loop, i.e. under inference mode: train outside it
    with preserved_rng(device), torch.inference_mode(False), torch.enable_grad():
        x, y = x.clone(), y.clone()  # normal tensors (inputs made under inference mode cannot enter autograd)
        torch.manual_seed(int(seed))
        gen = torch.Generator().manual_seed(int(seed))
        try:
            work = copy.deepcopy(model)
        except Exception as err:  # pragma: no cover - exotic modules
            raise TypeError(f"BaDExpert needs to deep-copy the model to fine-tune it: {err!r}") from err
        work.train()
        params = [p for p in work.parameters() if p.requires_grad]
        opt = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
        for _ in range(epochs):
            order = torch.randperm(len(x), generator=gen).to(device)
            for start in range(0, len(x), batch_size):
                idx = order[start:start + batch_size]
                if len(idx) < 2 and len(x) >= 2:  # BatchNorm in train mode needs two samples
                    continue
                loss = F.cross_entropy(work(x[idx]), y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
    return {k: v.detach().clone() for k, v in work.state_dict().items()}


def log_confidence_in(model: nn.Module, state: Dict[str, Tensor] | None, x: Tensor, labels: Tensor,
                      batch_size: int = 1024) -> Tensor:
    """``log softmax(f(x))[label]`` of the model run with the weights ``state`` (None: its own), in eval mode,
    in float64 (confidences of backdoored inputs sit within 1e-8 of 1)."""
    out = []
    with evaluating(model):
        for start in range(0, len(x), batch_size):
            xb = x[start:start + batch_size]
            logits = model(xb) if state is None else functional_call(model, state, (xb,))
            logp = torch.log_softmax(logits.double(), dim=1)
            out.append(logp.gather(1, labels[start:start + batch_size].long().view(-1, 1)).squeeze(1))
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64, device=x.device)


def combine(log_b: Tensor, log_aux: Tensor, rule: str = "ratio") -> Tensor:
    """BaDExpert's score from ``log B(ŷ|x)`` and ``log M'(ŷ|x)`` (higher = more likely poisoned).

    - ``"ratio"``: ``log B(ŷ|x) - log M'(ŷ|x)``: high when the backdoor expert still backs ``ŷ`` while the
      auxiliary model no longer does (a monotone transform of the ratio rule of the released code);
    - ``"triangle"``: ``-min(2 M'/B, (1 - B) / (1/2 - M'))`` (denominators clamped at 1e-8), the region of
      the released code's default for ResNet-18;
    - ``"expert"``: ``B(ŷ|x)`` alone (the detector before ensembling).
    """
    if rule == "ratio":
        return log_b - log_aux
    b, a = log_b.exp(), log_aux.exp()
    if rule == "expert":
        return b
    if rule == "triangle":
        return -torch.minimum(2 * a / b.clamp_min(1e-8), (1 - b) / (0.5 - a).clamp_min(1e-8))
    raise ValueError(f"rule must be one of {list(BADEXPERT_RULES)}, got {rule!r}")


def badexpert_score(model: nn.Module, x: Tensor, expert: Dict[str, Tensor], auxiliary: Dict[str, Tensor],
                    rule: str = "ratio", *, batch_size: int = 1024, return_parts: bool = False):
    """BaDExpert score of each input: ``ŷ`` from the model, then :func:`combine` of ``B(ŷ|x)`` and ``M'(ŷ|x)``.

    Cost: three forward passes per input (model, expert, auxiliary). With ``return_parts`` also returns
    ``(pred, log B(ŷ|x), log M'(ŷ|x))``.
    """
    with evaluating(model):
        preds = []
        for start in range(0, len(x), batch_size):
            preds.append(model(x[start:start + batch_size]).argmax(dim=1))
        pred = torch.cat(preds) if preds else torch.zeros(0, dtype=torch.long, device=x.device)
    log_b = log_confidence_in(model, expert, x, pred, batch_size)
    log_a = log_confidence_in(model, auxiliary, x, pred, batch_size)
    score = combine(log_b, log_a, rule)
    return (score, (pred, log_b, log_a)) if return_parts else score


def accuracy_with(model: nn.Module, state: Dict[str, Tensor], x: Tensor, y: Tensor) -> float:
    """Accuracy of the model run with the weights ``state`` on ``(x, y)`` (eval mode)."""
    with evaluating(model):
        pred = functional_call(model, state, (x,)).argmax(dim=1)
    return float((pred == y).float().mean()) if len(y) else float("nan")


def num_classes_of(model: nn.Module, x: Tensor) -> Tuple[int, Tensor]:
    """The model's number of output classes (from one forward on ``x[:1]``) and its predictions on ``x``."""
    with evaluating(model):
        logits = model(x)
    if not isinstance(logits, Tensor) or logits.dim() != 2:
        got = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
        raise ValueError(f"model must return logits of shape [N, num_classes], got {got}")
    return int(logits.shape[1]), logits.argmax(dim=1)
