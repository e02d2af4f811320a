"""Neural Cleanse as pure torch functions (no Lightning).

Wang et al., "Neural Cleanse: Identifying and Mitigating Backdoor Attacks in Neural Networks",
IEEE S&P 2019. Threat model: white-box (gradients of the model w.r.t. its input), data-limited (a
small set of clean labelled images).

For every label ``t`` a mask ``m`` (``[1, H, W]``, shared by the channels) and a pattern ``Δ``
(``[C, H, W]``) are optimised in **pixel space** ``[0, 1]`` -- the space in which attacks stamp
their triggers; the model normalises inside -- so that

    x̃ = (1 − m) ⊙ x + m ⊙ Δ,      min  CE(f(x̃), t) + λ · ‖m‖₁

with ``m = (tanh(w_m) + 1) / 2`` and ``Δ = (tanh(w_Δ) + 1) / 2`` (always in ``[0, 1]``), Adam and
the adaptive λ schedule of the public code (docs/neural_cleanse.md). **All labels are optimised
together**: the ``L`` mask/pattern pairs are stamped on the same mini-batch and go through the model
in one forward pass of ``L · B`` images; the loss is the sum of the per-label losses. The pairs
share no parameter and Adam is element-wise, so each pair receives exactly the gradient and the
update it would receive alone, and every per-label quantity (ASR, λ, counters, early stop) is a
vector: the batched run equals ``L`` per-label runs over the same mini-batches (up to float
round-off of the batched forward; tests/defenses/test_neural_cleanse.py checks it).

    res = reverse_engineer(model, x, y, steps=300, generator=torch.Generator().manual_seed(0))
    idx = anomaly_index(res.l1)              # MAD-based, x1.4826
    flagged = flagged_labels(res.l1)         # small-side index > 2
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...models.outputs import check_logits
from ...utils import evaluating

#: The consistency constant that makes the MAD estimate the standard deviation of normal data.
MAD_CONSTANT = 1.4826


@dataclass
class ReverseEngineered:
    """Result of :func:`reverse_engineer` for ``L`` labels (tensors on the model's device).

    Attributes:
        labels: ``[L]`` the labels reverse-engineered.
        masks: ``[L, 1, H, W]`` the smallest mask per label that reached the ASR threshold (or the
            last mask when none did), values in ``[0, 1]``.
        patterns: ``[L, C, H, W]`` the matching patterns, values in ``[0, 1]``.
        l1: ``[L]`` L1 norms of the masks.
        found: ``[L]`` bool, whether a mask reached the ASR threshold during the run.
        steps: ``[L]`` optimisation steps each label ran before it stopped early (or ``steps``).
    """

    labels: Tensor
    masks: Tensor
    patterns: Tensor
    l1: Tensor
    found: Tensor
    steps: Tensor


def to_unit(w: Tensor) -> Tensor:
    """The tanh parametrisation: ``(tanh(w) + 1) / 2``, always in ``[0, 1]``."""
    return torch.tanh(w).add(1.0).mul(0.5)


def from_unit(v: Tensor, eps: float = 1e-4) -> Tensor:
    """Inverse of :func:`to_unit` (clamped away from 0 and 1 so the result is finite)."""
    return torch.atanh(v.clamp(eps, 1 - eps).mul(2.0).sub(1.0))


def stamp(x: Tensor, mask: Tensor, pattern: Tensor) -> Tensor:
    """``(1 − mask) ⊙ x + mask ⊙ pattern`` (a new tensor; ``x`` is untouched).

    ``x``: ``[N, C, H, W]``; ``mask``: ``[1, H, W]`` or ``[N, 1, H, W]``; ``pattern``: ``[C, H, W]``
    or ``[N, C, H, W]``. All in ``[0, 1]``, so the result is in ``[0, 1]``.

    Example:
        >>> x = torch.zeros(2, 1, 3, 3)
        >>> m = torch.zeros(1, 3, 3); m[0, 0, 0] = 1.0
        >>> stamp(x, m, torch.ones(1, 3, 3))[:, 0, 0, 0].tolist()
        [1.0, 1.0]
    """
    return x * (1.0 - mask) + mask * pattern


def _stamp_all(x: Tensor, masks: Tensor, patterns: Tensor) -> Tensor:
    """``[L·B, C, H, W]``: every one of the ``L`` triggers stamped on the same ``B`` images (label-major)."""
    L, B = masks.shape[0], x.shape[0]
    out = x.unsqueeze(0) * (1.0 - masks.unsqueeze(1)) + masks.unsqueeze(1) * patterns.unsqueeze(1)
    return out.reshape(L * B, *x.shape[1:])


def reverse_engineer(
    model: nn.Module,
    x: Tensor,
    y: Optional[Tensor] = None,
    labels: Optional[Sequence[int]] = None,
    *,
    num_classes: Optional[int] = None,
    steps: int = 300,
    batch_size: int = 32,
    lr: float = 0.1,
    init_cost: float = 1e-3,
    cost_multiplier: float = 1.5,
    patience: int = 5,
    early_stop_patience: int = 20,
    asr_threshold: float = 0.99,
    generator: Optional[torch.Generator] = None,
    batched: bool = True,
    progress: Optional[Callable[[int], None]] = None,
) -> ReverseEngineered:
    """Reverse-engineer the smallest trigger sending clean inputs to each label (docs/neural_cleanse.md).

    λ schedule (per label, the public code's): λ starts at 0; once the mini-batch ASR has been
    ``>= asr_threshold`` for ``patience`` consecutive steps, λ is set to ``init_cost``; afterwards it
    is multiplied by ``cost_multiplier`` after ``patience`` steps at or above the threshold and
    divided by ``cost_multiplier ** 1.5`` after ``patience`` steps below. The smallest-L1 mask among
    those that reached the threshold is kept; a label stops once that norm has not improved for
    ``early_stop_patience`` steps after λ has moved both up and down.

    One *step* is one Adam update on one mini-batch of ``batch_size`` clean images, drawn with
    ``generator`` (the same mini-batches for every label). The model is evaluated in eval mode, its
    gradients are never accumulated (``torch.autograd.grad`` w.r.t. the trigger only) and its modes
    are restored: the model is not modified.

    Args:
        model: classifier returning logits ``[N, K]`` for pixel-space input.
        x: clean images ``[N, C, H, W]`` in ``[0, 1]`` on the model's device.
        y: their labels (unused by the optimisation; kept for the caller's reports).
        labels: labels to reverse-engineer (default: all ``K``).
        num_classes: ``K`` when ``labels`` is None (default: read from a forward pass).
        steps: maximum optimisation steps per label.
        batch_size: clean images per step.
        lr: Adam learning rate on the tanh parameters.
        init_cost: the first non-zero λ.
        cost_multiplier: λ factor up (and ``** 1.5`` down).
        patience: steps above/below the threshold before λ moves.
        early_stop_patience: steps without a smaller mask before a label stops.
        asr_threshold: share of a mini-batch sent to the label for a mask to count.
        generator: randomness of the initial trigger and the mini-batches (global RNG untouched
            when given).
        batched: optimise all labels in the same forward passes (``False``: one label after the
            other, the reference loop; same results).
        progress: called with the number of steps done after each step (batched) or each label's
            step (per-label loop), e.g. a progress bar's ``update``.

    Example:
        >>> net = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
        >>> res = reverse_engineer(net, torch.rand(8, 1, 4, 4), steps=5, batch_size=4,
        ...                        generator=torch.Generator().manual_seed(0))
        >>> res.masks.shape, res.patterns.shape, bool((res.masks >= 0).all() and (res.masks <= 1).all())
        (torch.Size([3, 1, 4, 4]), torch.Size([3, 1, 4, 4]), True)
    """
    if x.dim() != 4 or len(x) == 0:
        raise ValueError(f"reverse_engineer needs clean images [N, C, H, W] with N >= 1, got shape {tuple(x.shape)}")
    device = x.device
    if labels is None:
        if num_classes is None:
            with evaluating(model):
                num_classes = int(check_logits(model(x[:1]), "the model (Neural Cleanse)").shape[1])
        labels = list(range(num_classes))
    labels_t = torch.as_tensor(list(labels), dtype=torch.long, device=device)
    L = len(labels_t)
    _, C, H, W = x.shape
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    # initial triggers and the mini-batch schedule come from the generator, identically for both paths
    init_m = torch.rand(L, 1, H, W, generator=g).to(device=device, dtype=x.dtype)
    init_p = torch.rand(L, C, H, W, generator=g).to(device=device, dtype=x.dtype)
    bs = min(batch_size, len(x))
    batches = [torch.randint(len(x), (bs,), generator=g).to(device) for _ in range(steps)]
    settings = dict(steps=steps, lr=lr, init_cost=init_cost, cost_multiplier=cost_multiplier, patience=patience,
                    early_stop_patience=early_stop_patience, asr_threshold=asr_threshold)
    # a callback may run this inside Lightning's test loop (inference mode): optimise outside it
    with torch.inference_mode(False), torch.enable_grad():
        x = x.clone()
        return _run(model, x, labels_t, init_m.clone(), init_p.clone(), [b.clone() for b in batches], batched,
                    progress, settings)


def _run(model: nn.Module, x: Tensor, labels_t: Tensor, init_m: Tensor, init_p: Tensor, batches: List[Tensor],
         batched: bool, progress: Optional[Callable[[int], None]], settings: dict) -> ReverseEngineered:
    L = len(labels_t)
    if batched:
        return _optimise(model, x, labels_t, init_m, init_p, batches, progress=progress, **settings)
    parts = [_optimise(model, x, labels_t[i:i + 1], init_m[i:i + 1], init_p[i:i + 1], batches, progress=progress,
                       **settings) for i in range(L)]
    return ReverseEngineered(
        labels=labels_t, masks=torch.cat([p.masks for p in parts]), patterns=torch.cat([p.patterns for p in parts]),
        l1=torch.cat([p.l1 for p in parts]), found=torch.cat([p.found for p in parts]),
        steps=torch.cat([p.steps for p in parts]))


def _optimise(model: nn.Module, x: Tensor, labels: Tensor, init_m: Tensor, init_p: Tensor, batches: List[Tensor], *,
              steps: int, lr: float, init_cost: float, cost_multiplier: float, patience: int, early_stop_patience: int,
              asr_threshold: float, progress: Optional[Callable[[int], None]]) -> ReverseEngineered:
    device, L = x.device, len(labels)
    wm = from_unit(init_m).clone().requires_grad_(True)
    wp = from_unit(init_p).clone().requires_grad_(True)
    opt = torch.optim.Adam([wm, wp], lr=lr, betas=(0.5, 0.9))
    zeros_f = torch.zeros(L, device=device, dtype=torch.float64)
    zeros_i = torch.zeros(L, device=device, dtype=torch.long)
    cost = zeros_f.clone()
    cost_set = torch.zeros(L, dtype=torch.bool, device=device)
    set_counter, up_counter, down_counter, stop_counter = zeros_i.clone(), zeros_i.clone(), zeros_i.clone(), zeros_i.clone()
    up_flag = torch.zeros(L, dtype=torch.bool, device=device)
    down_flag = torch.zeros(L, dtype=torch.bool, device=device)
    best_l1 = torch.full((L,), float("inf"), device=device, dtype=torch.float64)
    stop_best = best_l1.clone()
    best_m, best_p = init_m.clone(), init_p.clone()
    active = torch.ones(L, dtype=torch.bool, device=device)
    ran = zeros_i.clone()
    mult_up, mult_down = float(cost_multiplier), float(cost_multiplier) ** 1.5
    with evaluating(model, grad=True):
        for step in range(steps):
            idx = torch.nonzero(active).flatten()
            if len(idx) == 0:
                break
            xb = x[batches[step]]
            B = len(xb)
            m_all, p_all = to_unit(wm), to_unit(wp)
            m, p = m_all[idx], p_all[idx]
            logits = check_logits(model(_stamp_all(xb, m, p)), "the model (Neural Cleanse)").view(len(idx), B, -1)
            tgt = labels[idx].view(-1, 1).expand(-1, B)
            ce = F.cross_entropy(logits.reshape(len(idx) * B, -1).float(), tgt.reshape(-1), reduction="none")
            ce = ce.view(len(idx), B).mean(dim=1)
            l1 = m.flatten(1).abs().sum(dim=1)
            loss = (ce + cost[idx].to(ce.dtype) * l1.float()).sum()
            gm, gp = torch.autograd.grad(loss, [wm, wp])
            wm.grad, wp.grad = gm, gp
            opt.step()
            with torch.no_grad():
                asr = (logits.argmax(dim=-1) == tgt).float().mean(dim=1).double()
                l1d = l1.detach().double()
                ok = asr >= asr_threshold
                ran[idx] += 1
                # keep the smallest mask that reached the threshold (the mask of this step's forward)
                better = ok & (l1d < best_l1[idx])
                bi = idx[better]
                best_l1[bi] = l1d[better]
                best_m[bi], best_p[bi] = m.detach()[better], p.detach()[better]
                # lambda schedule
                c_set = cost_set[idx]
                # (a) before lambda is set: count steps at/above threshold
                pre = ~c_set
                sc = torch.where(ok, set_counter[idx] + 1, torch.zeros_like(set_counter[idx]))
                set_counter[idx] = torch.where(pre, sc, set_counter[idx])
                start = pre & (set_counter[idx] >= patience)
                si = idx[start]
                cost[si] = float(init_cost)
                cost_set[si] = True
                set_counter[si] = 0
                # (b) once set: multiply / divide after patience steps above / below
                post = c_set
                up = torch.where(ok, up_counter[idx] + 1, torch.zeros_like(up_counter[idx]))
                down = torch.where(ok, torch.zeros_like(down_counter[idx]), down_counter[idx] + 1)
                up_counter[idx] = torch.where(post, up, up_counter[idx])
                down_counter[idx] = torch.where(post, down, down_counter[idx])
                go_up = post & (up_counter[idx] >= patience)
                go_down = post & ~go_up & (down_counter[idx] >= patience)
                ui, di = idx[go_up], idx[go_down]
                up_counter[ui] = 0
                cost[ui] *= mult_up
                up_flag[ui] = True
                down_counter[di] = 0
                cost[di] /= mult_down
                down_flag[di] = True
                # early stop: no smaller mask for early_stop_patience steps after lambda moved both ways
                have = torch.isfinite(best_l1[idx])
                improved = best_l1[idx] < stop_best[idx]
                stop_counter[idx] = torch.where(have & ~improved, stop_counter[idx] + 1, torch.zeros_like(stop_counter[idx]))
                stop_best[idx] = torch.minimum(stop_best[idx], best_l1[idx])
                done = have & up_flag[idx] & down_flag[idx] & (stop_counter[idx] >= early_stop_patience)
                active[idx[done]] = False
            if progress is not None:
                progress(1)
        with torch.no_grad():
            found = torch.isfinite(best_l1)
            last_m, last_p = to_unit(wm).detach(), to_unit(wp).detach()
            masks = torch.where(found.view(-1, 1, 1, 1), best_m, last_m)
            patterns = torch.where(found.view(-1, 1, 1, 1), best_p, last_p)
    l1_out = masks.flatten(1).abs().sum(dim=1)
    return ReverseEngineered(labels=labels, masks=masks, patterns=patterns, l1=l1_out, found=found, steps=ran)


def median(v: Tensor) -> Tensor:
    """The median with the two middle values averaged for even counts (as ``numpy.median``)."""
    s = v.sort().values
    n = len(s)
    return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2


def anomaly_index(l1: Tensor) -> Tensor:
    """``|l1 − median| / (1.4826 · MAD)`` per label (MAD: median absolute deviation of the norms).

    When MAD is 0 (at least half the norms are equal), the index is 0 for norms at the median and
    ``inf`` for the others, never NaN.

    Example:
        >>> [round(v, 3) for v in anomaly_index(torch.tensor([10.0, 11.0, 9.0, 10.0, 2.0])).tolist()]
        [0.0, 0.674, 0.674, 0.0, 5.396]
    """
    v = l1.detach().double().flatten()
    if v.numel() == 0:
        raise ValueError("anomaly_index needs at least one mask norm")
    if not bool(torch.isfinite(v).all()):
        raise ValueError(f"mask norms must be finite, got {v.tolist()}")
    dev = (v - median(v)).abs()
    mad = MAD_CONSTANT * median(dev)
    if float(mad) == 0.0:
        return torch.where(dev == 0, torch.zeros_like(dev), torch.full_like(dev, float("inf")))
    return dev / mad


def flagged_labels(l1: Tensor, labels: Optional[Tensor] = None, threshold: float = 2.0,
                   found: Optional[Tensor] = None) -> List[int]:
    """Labels whose mask norm is **below** the median with an anomaly index above ``threshold``.

    Labels with no mask reaching the ASR threshold (``found`` False) are never flagged.
    """
    idx = anomaly_index(l1)
    med = median(l1.detach().double().flatten())
    small = (l1.detach().double().flatten() < med) & (idx > threshold)
    if found is not None:
        small &= found.to(small.device)
    labels = labels if labels is not None else torch.arange(len(idx))
    return [int(labels[i]) for i in torch.nonzero(small).flatten().tolist()]


def trigger_asr(model: nn.Module, x: Tensor, y: Tensor, mask: Tensor, pattern: Tensor, label: int,
                batch_size: int = 256) -> float:
    """Share of the images whose label is not ``label`` that the stamped trigger sends to ``label``
    (NaN when every image has that label)."""
    keep = y != label
    xs = x[keep.to(x.device)]
    if len(xs) == 0:
        return float("nan")
    hits = 0
    with evaluating(model):
        for i in range(0, len(xs), batch_size):
            out = check_logits(model(stamp(xs[i:i + batch_size], mask, pattern)), "the model (Neural Cleanse)")
            hits += int((out.argmax(dim=-1) == label).sum())
    return hits / len(xs)


def mask_overlap(mask: Tensor, true_mask: Tensor) -> Dict[str, float]:
    """How well a reversed mask matches a known trigger region (``true_mask``: ``[H, W]``, nonzero = trigger).

    Returns ``mass_in_trigger`` (share of the reversed mask's L1 mass inside the true region) and
    ``iou_topk`` (IoU between the true region and the reversed mask's ``k`` largest pixels, ``k`` =
    the region's size).

    Example:
        >>> m = torch.zeros(1, 4, 4); m[0, 3, 3] = 1.0
        >>> t = torch.zeros(4, 4); t[3, 3] = 1
        >>> mask_overlap(m, t)
        {'mass_in_trigger': 1.0, 'iou_topk': 1.0}
    """
    m = mask.detach().double().reshape(-1, *mask.shape[-2:]).mean(dim=0).flatten()
    t = (true_mask.detach().reshape(-1, *true_mask.shape[-2:]).abs().sum(dim=0) > 0).flatten().to(m.device)
    if m.numel() != t.numel():
        raise ValueError(f"mask of spatial size {tuple(mask.shape[-2:])} and true_mask of spatial size "
                         f"{tuple(true_mask.shape[-2:])} differ")
    k = int(t.sum())
    if k == 0:
        raise ValueError("true_mask marks no pixel; pass the trigger region (nonzero where the trigger is)")
    total = float(m.sum())
    mass = float(m[t].sum()) / total if total > 0 else 0.0
    top = torch.zeros_like(t)
    top[m.topk(k).indices] = True
    iou = float((top & t).sum()) / float((top | t).sum())
    return {"mass_in_trigger": mass, "iou_topk": iou}


# -- neurons: filter and pruning ------------------------------------------------------------------
def find_layer(model: nn.Module, layer: str) -> nn.Module:
    """The submodule named ``layer`` (as in ``model.named_modules()``), or a ValueError listing the names."""
    modules = dict(model.named_modules())
    if not isinstance(layer, str) or layer not in modules or layer == "":
        names = [n for n in modules if n]
        shown = ", ".join(names[:30]) + (", ..." if len(names) > 30 else "")
        raise ValueError(f"layer={layer!r} is not a submodule of the model; known layers: {shown}")
    return modules[layer]


def default_layer(model: nn.Module) -> str:
    """The name of the module whose output feeds the last ``nn.Linear`` -- the penultimate features --
    or, when that cannot be told, the last ``nn.Linear``'s own name is used with its input."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not names:
        raise ValueError("the model has no nn.Linear layer to take the penultimate features from; pass layer=<name> "
                         "of a submodule whose output holds the neurons to inspect")
    return names[-1]


def layer_activations(model: nn.Module, x: Tensor, layer: str, *, use_input: bool = False,
                      batch_size: int = 256) -> Tensor:
    """Per-neuron activations ``[N, D]`` of ``layer``'s output (its input with ``use_input``): channels
    averaged over space for conv maps, flattened for vectors."""
    mod = find_layer(model, layer)
    store: List[Tensor] = []

    def hook(module, inputs, output):
        a = inputs[0] if use_input else output
        store.append(a.flatten(2).mean(dim=2) if a.dim() > 2 else a.flatten(1))

    handle = mod.register_forward_hook(hook)
    try:
        with evaluating(model):
            for i in range(0, len(x), batch_size):
                model(x[i:i + batch_size])
    finally:
        handle.remove()
    return torch.cat(store).float() if store else torch.zeros(0, 0, device=x.device)


def rank_neurons(clean_act: Tensor, triggered_act: Tensor) -> Tensor:
    """Neuron indices sorted by how much more the reversed trigger excites them (mean activation on
    triggered minus on clean images), most excited first."""
    return (triggered_act.mean(dim=0) - clean_act.mean(dim=0)).argsort(descending=True)


class NeuronMask:
    """A forward hook zeroing neurons (channels) of one layer's output: pruning without touching weights.

    Attach to a **copy** of the model under inspection (``copy.deepcopy``); ``remove()`` detaches it.
    """

    def __init__(self, module: nn.Module, num_neurons: int, device: torch.device) -> None:
        self.keep = torch.ones(num_neurons, device=device)
        self.handle = module.register_forward_hook(self._hook)

    def _hook(self, module, inputs, output):
        shape = [1, -1] + [1] * (output.dim() - 2)
        return output * self.keep.view(shape).to(output.dtype)

    def prune(self, neurons: Tensor) -> None:
        self.keep[neurons.to(self.keep.device)] = 0.0

    def remove(self) -> None:
        self.handle.remove()


def accuracy(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 256) -> float:
    """Share of ``x`` predicted as ``y``."""
    if len(x) == 0:
        return float("nan")
    hits = 0
    with evaluating(model):
        for i in range(0, len(x), batch_size):
            hits += int((model(x[i:i + batch_size]).argmax(dim=-1) == y[i:i + batch_size].to(x.device)).sum())
    return hits / len(x)
