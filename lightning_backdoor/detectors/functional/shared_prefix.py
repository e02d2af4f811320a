"""Split a model's fx graph at a set of submodules, so that everything before them runs once per batch.

Detectors that run one model many times with a few *late* layers changed (IBD-PSC amplifies the
last BatchNorm layers; pruning and neuron-filter defences edit one late layer) recompute the same
early layers each time. :class:`SharedPrefixRunner` traces the model once with ``torch.fx``, puts
every node downstream of the chosen modules into a *suffix* graph and the rest into a *prefix*
graph, and then evaluates ``prefix(x)`` once and ``suffix(values, overrides)`` once per variant,
where ``overrides`` replaces parameters of the suffix through :func:`torch.func.functional_call`
(in the autograd graph; the model itself is never modified).

Example:
    >>> import torch
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Conv2d(2, 2, 3), nn.Flatten(), nn.Linear(8, 3)).eval()
    >>> runner = SharedPrefixRunner(net, ["2"])
    >>> x = torch.rand(4, 1, 6, 6)
    >>> plain, doubled = runner.run(x, [{}, {"4.weight": 2 * net[4].weight, "4.bias": 2 * net[4].bias}])
    >>> torch.allclose(plain, net(x)), torch.allclose(doubled, 2 * net(x), atol=1e-6)
    (True, True)
"""

from __future__ import annotations

import warnings
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.fx
from torch import Tensor, nn
from torch.func import functional_call

from ...utils import evaluating

__all__ = ["SharedPrefixRunner"]

# Model classes for which the "cannot trace, falling back" warning was already shown.
_FALLBACK_WARNED: set = set()


class SharedPrefixRunner:
    """A model split into a shared prefix and a suffix starting at the earliest of ``modules``.

    The model is traced with ``torch.fx.symbolic_trace`` (in eval mode). Nodes that are calls of one
    of ``modules``, or that depend on one, form the *suffix*; everything else is the *prefix*. Both
    are GraphModules holding the model's own submodules (no parameter copies), so later in-place
    weight changes are seen; a structural change (a submodule or tensor swapped, ``.to()`` replacing
    buffers) needs a new runner (compare :meth:`signature`).

    Args:
        model: the network, traced once here.
        modules: qualified names of submodules whose parameters a variant may override; each must be
            called as a module in the traced graph.

    Raises:
        ValueError: ``modules`` is empty.
        RuntimeError: one of ``modules`` is not called as a module in the traced graph.
        Exception: whatever ``torch.fx`` raises for untraceable models. Use :meth:`try_build` for a
            checked build that returns None instead.
    """

    def __init__(self, model: nn.Module, modules: Sequence[str]) -> None:
        modules = list(modules)
        if not modules:
            raise ValueError("modules must name at least one submodule to split the model at")
        self.modules = frozenset(modules)
        with evaluating(model):
            traced = torch.fx.symbolic_trace(model)
        self.prefix, self.suffix = self._split(traced, self.modules)

    @staticmethod
    def _split(traced: torch.fx.GraphModule, split_at: frozenset) -> Tuple[torch.fx.GraphModule, torch.fx.GraphModule]:
        graph = traced.graph
        nodes = list(graph.nodes)
        called = {n.target for n in nodes if n.op == "call_module"}
        missing = sorted(split_at - called)
        if missing:
            raise RuntimeError(f"modules {missing} are not called as modules in the traced graph")
        in_suffix: set = set()
        for node in nodes:
            if node.op == "output":
                continue
            if (node.op == "call_module" and node.target in split_at) or any(a in in_suffix for a in node.all_input_nodes):
                in_suffix.add(node)
        output = next(n for n in nodes if n.op == "output")
        boundary: List[torch.fx.Node] = []
        for node in nodes:
            if node in in_suffix or node is output:
                for a in node.all_input_nodes:
                    if a not in in_suffix and a.op != "get_attr" and a not in boundary:
                        boundary.append(a)

        prefix = torch.fx.Graph()
        penv: Dict[torch.fx.Node, torch.fx.Node] = {}
        for node in nodes:
            if node in in_suffix or node is output:
                continue
            penv[node] = prefix.node_copy(node, lambda a: penv[a])
        prefix.output(tuple(penv[b] for b in boundary))

        suffix = torch.fx.Graph()
        senv: Dict[torch.fx.Node, torch.fx.Node] = {b: suffix.placeholder(b.name) for b in boundary}

        def arg(a: torch.fx.Node) -> torch.fx.Node:
            if a not in senv:  # a parameter/buffer read by the suffix: read it there too
                senv[a] = suffix.node_copy(a)
            return senv[a]

        for node in nodes:
            if node in in_suffix or node is output:
                senv[node] = suffix.node_copy(node, arg)
        prefix_module = torch.fx.GraphModule(traced, prefix)
        if prefix_module.graph.eliminate_dead_code():
            prefix_module.recompile()
        return prefix_module, torch.fx.GraphModule(traced, suffix)

    def run(self, x: Tensor, overrides: Sequence[Mapping[str, Tensor]]) -> List[Tensor]:
        """The model's output once per entry of ``overrides`` (``{parameter name: tensor}``; ``{}``: the model).

        The prefix runs once; parameter names are the model's own (``"layer4.1.bn2.weight"``) and must
        belong to the suffix.
        """
        values = tuple(self.prefix(x))
        outs = []
        for params in overrides:
            outs.append(functional_call(self.suffix, dict(params), values) if params else self.suffix(*values))
        return outs

    @classmethod
    def try_build(
        cls,
        model: nn.Module,
        modules: Sequence[str],
        example: Optional[Tensor] = None,
        checks: Sequence[Tuple[Mapping[str, Tensor], Callable[[Tensor], Tensor]]] = (),
        what: str = "the model",
    ) -> Optional["SharedPrefixRunner"]:
        """Build a runner and check it; on failure warn once per model class and return None.

        With ``example``, the runner's output is compared with ``model(example)`` and, for each
        ``(overrides, reference)`` in ``checks``, with ``reference(example)``, on up to two samples,
        so a trace that silently specialised control flow is rejected.
        """
        try:
            runner = cls(model, modules)
            if example is not None:
                with evaluating(model):
                    ex = example[:2]
                    for params, ref_fn in [({}, model)] + list(checks):
                        got, ref = runner.run(ex, [params])[0], ref_fn(ex)
                        if got.shape != ref.shape or not torch.allclose(got, ref, rtol=1e-4, atol=1e-5):
                            raise RuntimeError("the traced graph does not reproduce the model's output")
            return runner
        except Exception as err:
            key = type(model).__qualname__
            if key not in _FALLBACK_WARNED:
                _FALLBACK_WARNED.add(key)
                warnings.warn(
                    f"could not split {type(model).__name__} with torch.fx ({type(err).__name__}: {err}); "
                    f"falling back to one full forward pass per variant of {what} (same results, slower)",
                    UserWarning,
                    stacklevel=2,
                )
            return None

    @staticmethod
    def signature(model: nn.Module) -> Tuple[Any, ...]:
        """Identity of the model's modules and tensors; a runner is valid while this is unchanged."""
        return (
            tuple((n, id(m)) for n, m in model.named_modules()),
            tuple((n, id(t)) for n, t in model.named_parameters()),
            tuple((n, id(t)) for n, t in model.named_buffers()),
        )
