"""Pure-torch optimisation behind the fitted attacks: PGD, universal perturbations, surrogate training.

No Lightning here. Every function works on batches, on the device of the model and images it is
given, and draws randomness only from the ``torch.Generator`` it is passed (the global RNG is left
alone), so the same inputs give the same outputs.

- :func:`pgd_untargeted`: L∞ projected gradient ascent of the cross-entropy of the true label
  (Label-Consistent's "make the image hard" step), over a whole batch at once.
- :func:`universal_perturbation`: one ``δ`` with ``‖δ‖∞ ≤ ε`` that pulls every image of a set
  towards a target class (TUAP over images of all classes, NARCISSUS over target-class images).
- :func:`train_classifier`: a few seeded epochs of Adam on a tensor dataset (the surrogate models).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..utils import evaluating


def _batches(n: int, batch_size: int, generator: torch.Generator | None = None):
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    for start in range(0, n, batch_size):
        yield order[start:start + batch_size]


def pgd_untargeted(model: nn.Module, x: Tensor, y: Tensor, eps: float, step_size: float, steps: int,
                   batch_size: int = 256) -> Tensor:
    """Untargeted L∞ PGD: ``x' = Π_{‖x'-x‖∞≤ε, x'∈[0,1]} (x' + α·sign(∇ CE(f(x'), y)))``, ``steps`` times.

    Starts at ``x`` (no random start, as Turner et al.), works on ``batch_size`` images at a time on
    the model's device; the model is put in eval mode for the attack and its mode restored after.
    The result lies in the ε-ball around ``x`` and in ``[0, 1]``.

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3))
        >>> x = torch.rand(5, 1, 2, 2)
        >>> xa = pgd_untargeted(net, x, torch.zeros(5, dtype=torch.long), eps=0.1, step_size=0.05, steps=3)
        >>> bool((xa - x).abs().max() <= 0.1 + 1e-6), bool(xa.min() >= 0 and xa.max() <= 1)
        (True, True)
    """
    out = torch.empty_like(x)
    device = next((p.device for p in model.parameters()), x.device)
    with evaluating(model, grad=True):
        for idx in _batches(len(x), batch_size):
            x0 = x[idx].to(device)
            yb = y[idx].to(device)
            xa = x0.clone()
            for _ in range(steps):
                xa.requires_grad_(True)
                loss = F.cross_entropy(model(xa), yb)
                (grad,) = torch.autograd.grad(loss, xa)
                with torch.no_grad():
                    xa = xa + step_size * grad.sign()
                    xa = torch.min(torch.max(xa, x0 - eps), x0 + eps).clamp(0, 1)
            out[idx] = xa.detach().to(out.device)
    return out


def universal_perturbation(model: nn.Module, images: Tensor, target: int, eps: float, step_size: float,
                           epochs: int, batch_size: int = 128, generator: torch.Generator | None = None) -> Tensor:
    """A universal targeted L∞ perturbation ``δ = argmin_{‖δ‖∞≤ε} Σ_x CE(f(clip(x + δ)), t)``.

    Signed-gradient steps of size ``step_size`` on the mean loss of each batch, projected to the
    ε-ball after every step, ``epochs`` passes over ``images`` in a seeded order. Returns ``δ`` of
    shape ``[C, H, W]`` on the images' device.

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3))
        >>> d = universal_perturbation(net, torch.rand(8, 1, 2, 2), target=2, eps=0.05, step_size=0.01, epochs=2)
        >>> d.shape, bool(d.abs().max() <= 0.05 + 1e-6)
        (torch.Size([1, 2, 2]), True)
    """
    device = next((p.device for p in model.parameters()), images.device)
    delta = torch.zeros(images.shape[1:], device=device, dtype=images.dtype)
    with evaluating(model, grad=True):
        for _ in range(epochs):
            for idx in _batches(len(images), batch_size, generator):
                xb = images[idx].to(device)
                delta.requires_grad_(True)
                logits = model((xb + delta).clamp(0, 1))
                loss = F.cross_entropy(logits, torch.full((len(xb),), int(target), device=device))
                (grad,) = torch.autograd.grad(loss, delta)
                with torch.no_grad():
                    delta = (delta - step_size * grad.sign()).clamp(-eps, eps)
    return delta.detach().to(images.device)


def train_classifier(model: nn.Module, x: Tensor, y: Tensor, epochs: int, batch_size: int = 64, lr: float = 3e-3,
                     generator: torch.Generator | None = None,
                     loss_fn: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy) -> nn.Module:
    """``epochs`` passes of Adam over ``(x, y)`` in a seeded order, on the model's device; returns the model in eval mode."""
    device = next((p.device for p in model.parameters()), x.device)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(epochs):
        for idx in _batches(len(x), batch_size, generator):
            opt.zero_grad(set_to_none=True)
            loss_fn(model(x[idx].to(device)), y[idx].to(device)).backward()
            opt.step()
    return model.eval()


def accuracy(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 512) -> float:
    """Top-1 accuracy of ``model`` on ``(x, y)`` (eval mode, no grad)."""
    device = next((p.device for p in model.parameters()), x.device)
    correct = 0
    with evaluating(model):
        for idx in _batches(len(x), batch_size):
            correct += int((model(x[idx].to(device)).argmax(1).cpu() == y[idx].cpu()).sum())
    return correct / max(1, len(x))
