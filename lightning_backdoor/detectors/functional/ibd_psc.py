"""IBD-PSC: input-level backdoor detection by parameter-oriented scaling consistency (torch only).

Paper: Hou et al., "IBD-PSC: Input-level Backdoor Detection via Parameter-oriented Scaling
Consistency", ICML 2024. Threat model: white-box (the defender reads and rescales the model's
batch-norm parameters), data-limited (≈100 local benign samples choose the first layer ``k``).

Amplifying one BN layer means ``γ̂ = ω·γ`` and ``β̂ = ω·β`` with the running statistics untouched.
``F̂_i^ω`` amplifies the *last* ``i`` BatchNorm2d layers in forward-execution order. The score is

    PSC(x) = (1/n) Σ_{i=k}^{k+n-1} softmax(F̂_i^ω(x))[y'],   y' = argmax f(x)

(higher ⇒ more likely poisoned). The amplified parameters are built inside the autograd graph
with :func:`torch.func.functional_call`, so the model is never mutated or copied and gradients
flow to the original ``γ``/``β`` (which the adaptive attacks in :mod:`lightning_backdoor.losses`
need).

All ``n`` amplified models agree on every layer before the first amplified BN. A
:class:`~.shared_prefix.SharedPrefixRunner` (:func:`amplification_runner`) splits an fx trace of the
model at that point, computes the prefix once per batch and runs only the suffix ``n + 1`` times
(``n`` amplified models and the original one for ``y'``). Models that ``torch.fx`` cannot trace fall
back to ``n + 1`` full forward passes.

Example:
    >>> import torch
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3),
    ...                     nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    >>> bn_layers(net)
    ['1', '4']
    >>> ibd_psc_score(net.eval(), torch.rand(2, 3, 8, 8), k=1, n=2).shape
    torch.Size([2])
"""

from __future__ import annotations

import warnings
import weakref
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.fx
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn.modules.batchnorm import _NormBase

from ...validation import check_choice, check_positive_float, check_positive_int, check_probability
from ...models.outputs import check_logits
from ...utils import evaluating, model_device, preserved_rng
from .shared_prefix import SharedPrefixRunner

__all__ = [
    "BNLayerCache",
    "amplification_runner",
    "amplified_forward",
    "amplified_layer_counts",
    "amplified_parameters",
    "bn_layers",
    "check_k",
    "fit_k",
    "ibd_psc_score",
    "run_amplified",
    "select_k",
]

LAYER_RANGES = ("paper", "published")
#: Why an amplification factor omega <= 1 is refused.
OMEGA_WHY = "IBD-PSC amplifies the BN parameters; omega <= 1 shrinks them or changes nothing, and the method loses its meaning"
# Layers IBD-PSC amplifies. SyncBatchNorm is what BatchNorm2d becomes under Lightning's sync_batchnorm.
_BN_TYPES = (nn.BatchNorm2d, nn.SyncBatchNorm)

LayerRef = Union[str, nn.Module]


# ------------------------------------------------------------------------------------------------
# Finding the BN layers
# ------------------------------------------------------------------------------------------------
def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _bn_candidates(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, _BN_TYPES)]


def _example_input(model: nn.Module, example: Optional[Tensor]) -> Tensor:
    """One input sample for tracing: the given example's first item, else a guessed 1×C×32×32 image."""
    ref = next((t for t in list(model.parameters()) + list(model.buffers()) if t.is_floating_point()), None)
    device = ref.device if ref is not None else torch.device("cpu")
    dtype = ref.dtype if ref is not None else torch.float32
    if example is not None:
        if not isinstance(example, Tensor):
            raise TypeError(f"example must be a Tensor input for the model, got {type(example).__name__}")
        return (example[:1] if example.dim() == 4 else example.unsqueeze(0)).to(device)
    channels = next((m.in_channels for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    if channels is None:
        channels = next(m.num_features for m in model.modules() if isinstance(m, _BN_TYPES))
    return torch.full((1, channels, 32, 32), 0.5, device=device, dtype=dtype)


def bn_layers(model: nn.Module, example: Optional[Tensor] = None) -> List[str]:
    """Qualified names of the model's BatchNorm2d layers in forward-execution order.

    The order is traced with forward hooks on one input (the first sample of ``example``, or a
    guessed ``1×C×32×32`` image), so "the last ``k`` BN layers counting from the output" is well
    defined for ResNets whose shortcut BNs are registered out of execution order. If the trace
    fails, registration order is used (with a warning). BN layers that do not run on the example
    are left out (with a warning): amplifying them would change nothing.

    Args:
        model: any ``nn.Module`` containing ``nn.BatchNorm2d`` (or ``nn.SyncBatchNorm``) layers.
        example: an input batch or single input the model accepts; only its first item is used.

    Returns:
        Names usable with ``model.get_submodule(name)``, first-executed first.

    Raises:
        ValueError: if the model has no BatchNorm2d layer (IBD-PSC has nothing to amplify).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    found = _bn_candidates(model)
    if not found:
        raise ValueError(
            f"IBD-PSC needs BatchNorm2d layers to amplify, but the model ({type(model).__name__}) has none"
        )
    name_of = {id(m): name for name, m in found}
    order: List[str] = []

    def hook(module: nn.Module, args: Any, output: Any) -> None:
        name = name_of[id(module)]
        if name not in order:
            order.append(name)

    handles = [m.register_forward_hook(hook) for _, m in found]
    try:
        x = _example_input(model, example)
        with preserved_rng(x.device), evaluating(model):
            model(x)
    except Exception as err:  # the guessed input may not fit the model: fall back, say so
        warnings.warn(
            f"could not trace the forward order of {type(model).__name__}'s BatchNorm2d layers "
            f"({type(err).__name__}: {err}); using registration order. Pass example= an input batch "
            "the model accepts to get the execution order.",
            UserWarning,
            stacklevel=2,
        )
        return [name for name, _ in found]
    finally:
        for h in handles:
            h.remove()
    missing = [name for name, _ in found if name not in order]
    if not order:
        raise ValueError(f"none of {type(model).__name__}'s BatchNorm2d layers ran in a forward pass; IBD-PSC needs them")
    if missing:
        warnings.warn(
            f"BatchNorm2d layers {missing} of {type(model).__name__} did not run in a forward pass and are ignored",
            UserWarning,
            stacklevel=2,
        )
    return order


# ------------------------------------------------------------------------------------------------
# Amplified forward passes
# ------------------------------------------------------------------------------------------------
def _layer_name(model: nn.Module, layer: LayerRef) -> str:
    if isinstance(layer, str):
        return layer
    for name, m in model.named_modules():
        if m is layer:
            return name
    raise ValueError(f"layer {type(layer).__name__} is not a submodule of {type(model).__name__}")


def amplified_parameters(model: nn.Module, layers: Sequence[LayerRef], omega: float) -> Dict[str, Tensor]:
    """``{name: ω·tensor}`` for the weight (γ) and bias (β) of each given BN layer, built in the autograd graph."""
    params: Dict[str, Tensor] = {}
    for layer in layers:
        name = _layer_name(model, layer)
        bn = model.get_submodule(name)
        if getattr(bn, "weight", None) is None or getattr(bn, "bias", None) is None:
            raise ValueError(
                f"BatchNorm layer {name!r} has no affine parameters (affine=False); IBD-PSC scales γ and β"
            )
        params[_join(name, "weight")] = bn.weight * omega
        params[_join(name, "bias")] = bn.bias * omega
    return params


def _frozen_running_stats(model: nn.Module) -> Dict[str, Tensor]:
    """Copies of the running statistics of every norm layer in training mode.

    Passing them to ``functional_call`` lets a train-mode pass use batch statistics as usual while
    its running-stat updates land on the copies, so the model's own buffers stay untouched.
    """
    stats: Dict[str, Tensor] = {}
    for name, m in model.named_modules():
        if isinstance(m, _NormBase) and m.training and m.track_running_stats:
            for buf in ("running_mean", "running_var", "num_batches_tracked"):
                t = getattr(m, buf, None)
                if t is not None:
                    stats[_join(name, buf)] = t.clone()
    return stats


def functional_forward(
    model: nn.Module, x: Tensor, params: Optional[Dict[str, Tensor]] = None, *, update_running_stats: bool = False
) -> Tensor:
    """``model(x)`` with some parameters replaced (``functional_call``), in the model's current mode.

    With ``update_running_stats=False`` (default) norm layers in training mode still normalise
    with batch statistics but their running statistics are not updated.
    """
    overrides = dict(params or {})
    if not update_running_stats:
        overrides.update(_frozen_running_stats(model))
    if not overrides:
        return model(x)
    return functional_call(model, overrides, (x,))


def amplified_forward(
    model: nn.Module,
    x: Tensor,
    layers: Sequence[LayerRef],
    omega: float,
    *,
    update_running_stats: bool = False,
) -> Tensor:
    """``F̂^ω(x)``: the model's output with γ and β of ``layers`` multiplied by ``omega``.

    Runs in the model's current mode (the detector uses eval mode; an adaptive attacker may call
    it in train mode). The model is neither mutated nor copied; the output is differentiable with
    respect to the original parameters. Running statistics are not updated unless
    ``update_running_stats``.

    Args:
        model: the network.
        x: its input.
        layers: BN layers to amplify (names from :func:`bn_layers` or the modules themselves).
        omega: amplification factor ω.
        update_running_stats: let train-mode norm layers update their running statistics.
    """
    return functional_forward(model, x, amplified_parameters(model, layers, omega), update_running_stats=update_running_stats)


# ------------------------------------------------------------------------------------------------
# Shared prefix: the layers before the first amplified BN run once per batch
# ------------------------------------------------------------------------------------------------
def amplification_runner(
    model: nn.Module,
    layers: Sequence[str],
    first: str,
    example: Optional[Tensor] = None,
    omega: float = 1.5,
) -> Optional[SharedPrefixRunner]:
    """A :class:`~.shared_prefix.SharedPrefixRunner` split at BN layer ``first`` (and every later one in
    ``layers``), checked against plain and fully amplified forwards on ``example``; None (with a
    one-time warning) when the model cannot be traced."""
    layers = list(layers)
    if first not in layers:
        raise ValueError(f"first={first!r} is not one of the BN layers {layers}")
    amp = layers[layers.index(first):]
    checks = []
    if example is not None:
        checks = [(amplified_parameters(model, amp, omega), lambda ex: amplified_forward(model, ex, amp, omega))]
    return SharedPrefixRunner.try_build(model, amp, example=example, checks=checks,
                                        what="the amplified model (IBD-PSC)")


def run_amplified(runner: SharedPrefixRunner, x: Tensor, layer_sets: Sequence[Sequence[str]], omega: float) -> List[Tensor]:
    """Outputs of the model with each set of BN layers amplified by ``omega`` (an empty set: the original
    model), the shared prefix computed once."""
    for layer_set in layer_sets:
        extra = [name for name in layer_set if name not in runner.modules]
        if extra:
            raise ValueError(f"layers {extra} lie before the runner's split point ({sorted(runner.modules)})")
    return runner.run(x, [amplified_parameters(runner.suffix, list(ls), omega) for ls in layer_sets])


class BNLayerCache:
    """Per-model cache of the BN layer order and of shared-prefix runners, holding no model alive.

    One entry (weakly keyed by the model), invalidated when the model's modules or tensors are
    swapped (:meth:`SharedPrefixRunner.signature`). Shared by the :class:`~lightning_backdoor.detectors.IBDPSC`
    detector and the :class:`~lightning_backdoor.losses.IBDPSCAdaptiveLoss`, so both see the same layers.
    """

    def __init__(self) -> None:
        self._cache: "weakref.WeakKeyDictionary[nn.Module, Tuple[Any, List[str], Dict[str, Any]]]" = (
            weakref.WeakKeyDictionary()
        )

    def _entry(self, model: nn.Module, x: Optional[Tensor]) -> Tuple[Any, List[str], Dict[str, Any]]:
        sig = SharedPrefixRunner.signature(model)
        entry = self._cache.get(model)
        if entry is None or entry[0] != sig:
            self._cache.clear()
            entry = (sig, bn_layers(model, x), {})
            self._cache[model] = entry
        return entry

    def layers(self, model: nn.Module, x: Optional[Tensor] = None) -> List[str]:
        """:func:`bn_layers` of ``model`` (traced on ``x`` the first time)."""
        return self._entry(model, x)[1]

    def runner(self, model: nn.Module, first: str, x: Tensor, omega: float) -> Optional[SharedPrefixRunner]:
        """The (cached) :func:`amplification_runner` split at ``first``, or None for untraceable models."""
        layers, runners = self._entry(model, x)[1:]
        if first not in runners:
            runners[first] = amplification_runner(model, layers, first, example=x, omega=omega)
        return runners[first]

    def clear(self) -> None:
        self._cache.clear()

    # pickling and deep copies: the cache is not state
    def __getstate__(self) -> Dict[str, Any]:
        return {}

    def __setstate__(self, state: Dict[str, Any]) -> None:
        self.__init__()

    def __deepcopy__(self, memo: Dict[int, Any]) -> "BNLayerCache":
        return BNLayerCache()


# ------------------------------------------------------------------------------------------------
# Layer selection and score
# ------------------------------------------------------------------------------------------------
def amplified_layer_counts(k: int, n: int, num_layers: int, layer_range: str = "paper", *, warn: bool = True) -> List[int]:
    """The ``i`` of the amplified models ``F̂_i^ω``: ``k…k+n-1`` ("paper") or ``k+1…k+n`` ("published").

    Counts above ``num_layers`` are clipped to it (duplicates dropped, so fewer models are averaged),
    with a warning.
    """
    check_k(k, num_layers)
    check_positive_int(n, "n")
    check_choice(layer_range, "layer_range", LAYER_RANGES)
    start = k if layer_range == "paper" else k + 1
    counts = list(range(start, start + n))
    if counts[-1] > num_layers:
        if warn:
            warnings.warn(
                f"IBD-PSC: k={k}, n={n} with layer_range={layer_range!r} asks for up to {counts[-1]} amplified "
                f"BN layers but the model has {num_layers}; clipping to {num_layers}",
                UserWarning,
                stacklevel=2,
            )
        counts = sorted({min(i, num_layers) for i in counts})
    return counts


def _batched_argmax_errors(model: nn.Module, x: Tensor, y: Tensor, layers: Sequence[str], omega: float, batch_size: int) -> float:
    wrong = 0
    for i in range(0, len(x), batch_size):
        logits = check_logits(amplified_forward(model, x[i : i + batch_size], layers, omega))
        wrong += int((logits.argmax(-1) != y[i : i + batch_size]).sum())
    return wrong / len(x)


def select_k(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    omega: float = 1.5,
    xi: float = 0.6,
    *,
    layers: Optional[Sequence[str]] = None,
    batch_size: int = 256,
) -> Tuple[int, List[float]]:
    """Adaptive layer selection (IBD-PSC Algorithm 1).

    For ``k = 1, 2, …, L`` the benign error rate ``η_k`` of ``argmax F̂_k^ω`` is computed on
    ``(x, y)`` (model in eval mode, no gradients); the first ``k`` with ``η_k > ξ`` is returned.

    Args:
        model: the (possibly backdoored) network with BatchNorm2d layers.
        x: local benign images ``[N, C, H, W]``.
        y: their labels ``[N]``.
        omega: amplification factor ω.
        xi: error-rate threshold ξ in ``[0, 1]``.
        layers: BN layer names in forward order (default: :func:`bn_layers` on ``x``).
        batch_size: forward-pass chunk size.

    Returns:
        ``(k, etas)`` where ``etas = [η_1, …, η_k]``.

    Raises:
        ValueError: if no ``k`` has ``η_k > ξ`` (the message lists every ``η_k``).
    """
    omega = check_positive_float(omega, "omega")
    xi = check_probability(xi, "xi")
    check_positive_int(batch_size, "batch_size")
    if not isinstance(x, Tensor) or not isinstance(y, Tensor) or x.dim() != 4 or y.dim() != 1 or len(x) != len(y) or len(x) == 0:
        raise ValueError("x and y must be a non-empty [N, C, H, W] image batch and [N] labels of the same length")
    device = model_device(model)
    x, y = x.to(device), y.to(device).long()
    layers = list(layers) if layers is not None else bn_layers(model, x)
    etas: List[float] = []
    with preserved_rng(device), evaluating(model):
        for k in range(1, len(layers) + 1):
            etas.append(_batched_argmax_errors(model, x, y, layers[len(layers) - k :], omega, batch_size))
            if etas[-1] > xi:
                return k, etas
    rates = ", ".join(f"η_{i + 1}={e:.3f}" for i, e in enumerate(etas))
    raise ValueError(
        f"IBD-PSC layer selection found no k with benign error rate above xi={xi} (omega={omega}, "
        f"{len(layers)} BatchNorm2d layers in {type(model).__name__}): {rates}. Amplifying its BN layers does not "
        "disturb benign predictions, so IBD-PSC has nothing to work with on this model; this is common for plain "
        "Conv-BN-ReLU stacks with a linear head, where amplification mostly rescales the logits. Try a larger "
        "omega, a smaller xi, or a fixed k."
    )


def check_k(k: int, num_layers: int) -> int:
    """``k`` must be an int in ``[1, num_layers]`` (the model's number of BatchNorm2d layers)."""
    check_positive_int(k, "k")
    if k > num_layers:
        raise ValueError(f"k must be at most the model's number of BatchNorm2d layers ({num_layers}), got k={k}")
    return k


def fit_k(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    k: Optional[int],
    *,
    omega: float = 1.5,
    xi: float = 0.6,
    layers: Optional[Sequence[str]] = None,
) -> Tuple[int, List[float]]:
    """IBD-PSC's fitting step, shared by the detector and the adaptive attack: with ``k=None`` the
    adaptive selection (:func:`select_k`) on benign ``(x, y)``; with a fixed ``k`` only the check that
    the model has that many BN layers. Returns ``(k, etas)`` (``etas`` empty for a fixed ``k``)."""
    layers = list(layers) if layers is not None else bn_layers(model, x)
    if k is None:
        return select_k(model, x, y, omega, xi, layers=layers)
    return check_k(k, len(layers)), []


def ibd_psc_score(
    model: nn.Module,
    x: Tensor,
    k: int,
    *,
    omega: float = 1.5,
    n: int = 5,
    layer_range: str = "paper",
    layers: Optional[Sequence[str]] = None,
    shared_prefix: bool = True,
    runner: Optional[SharedPrefixRunner] = None,
) -> Tensor:
    """IBD-PSC score ``PSC(x)`` per input; higher ⇒ more likely poisoned.

    The model runs in eval mode without gradients; its mode is restored afterwards and it is
    never modified.

    Args:
        model: the suspect network.
        x: inputs ``[N, C, H, W]`` (pixel space ``[0, 1]`` if the model normalises internally).
        k: number of last BN layers amplified in the first amplified model.
        omega: amplification factor ω.
        n: number of amplified models averaged.
        layer_range: ``"paper"`` (``k…k+n-1``) or ``"published"`` (the published code's ``k+1…k+n``).
        layers: BN layer names in forward order (default: :func:`bn_layers` on ``x``).
        shared_prefix: compute the layers before the first amplified BN once (fx-traced runner).
        runner: a prebuilt runner for this model (:func:`amplification_runner`, split at or before the
            first amplified layer; implies ``shared_prefix``).

    Returns:
        float64 Tensor ``[N]`` on the model's device (float32 would tie values near 1).
    """
    omega = check_positive_float(omega, "omega")
    device = model_device(model)
    x = x.to(device)
    if len(x) == 0:
        return torch.empty(0, device=device)
    layers = list(layers) if layers is not None else bn_layers(model, x)
    counts = amplified_layer_counts(k, n, len(layers), layer_range)
    sets = [[]] + [layers[len(layers) - i :] for i in counts]
    with evaluating(model):
        if runner is None and shared_prefix:
            runner = amplification_runner(model, layers, sets[-1][0], example=x, omega=omega)
        if runner is not None:
            outs = run_amplified(runner, x, sets, omega)
        else:
            outs = [amplified_forward(model, x, s, omega) for s in sets]
        pred = check_logits(outs[0]).argmax(-1, keepdim=True)
        # float64 softmax: poisoned PSC values sit within 1e-8 of 1, where float32 would tie them
        probs = torch.stack([o.double().softmax(-1).gather(-1, pred).squeeze(-1) for o in outs[1:]])
    return probs.mean(0)
