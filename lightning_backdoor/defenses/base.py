"""The common interface of model-level backdoor defences: ``(model, clean data) → report``.

An input-level :class:`~lightning_backdoor.detectors.Detector` asks "is this input poisoned?"; a
model-level defence asks "is this *model* backdoored, towards which label, with which trigger?"
and offers mitigations that return a repaired copy of the model (or a loss term for fine-tuning).

    nc = create_defense("neural_cleanse", steps=300)
    nc.fit(model, clean)            # clean: a DataLoader or an (x, y) pair, images in [0, 1]
    nc.flagged                      # labels judged infected, e.g. [0]
    nc.report()                     # one dict per label (norm, anomaly index, ASR of the reversed trigger, ...)
    repaired, history = nc.prune(model, clean)   # a mitigation: a repaired *copy*

The contract every defence keeps (tests/defenses/test_neural_cleanse.py):

- inputs are images in pixel space ``[0, 1]``, moved to the model's device; the model must return
  logits ``[N, K]`` with ``K >= 2``;
- the model under inspection is never modified: its parameters, buffers, gradients and modes are
  the same after ``fit`` and after every mitigation (mitigations work on a ``copy.deepcopy``);
- the caller's global RNG is untouched (the defence owns seeded generators);
- fitted state round-trips through ``state_dict`` / ``load_state_dict`` with tensors and plain
  Python values only, so it can be stored in a checkpoint and loaded with ``weights_only=True``.

Defences are plain objects holding settings and fitted state; no model reference is kept.
"""

from __future__ import annotations

from typing import Any, Dict, List

from torch import nn

from ..registry import Registry

DEFENSES = Registry("defense")


def create_defense(name: str, **kwargs: Any) -> "ModelDefense":
    """Build a registered model-level defence by name, e.g. ``create_defense("neural_cleanse", steps=100)``."""
    return DEFENSES.create(name, **kwargs)


def list_defenses(pattern: str = "*") -> list[str]:
    """Names of registered model-level defences matching an fnmatch ``pattern``."""
    return DEFENSES.list(pattern)


class ModelDefense:
    """Base class. Subclasses set ``name`` and implement ``fit`` and ``report``.

    Attributes:
        name: registry key and metric-name component (``test/{name}/anomaly_index``).
        threat_model: short description for docs and run metadata.
        fitted: whether ``fit`` ran (or a fitted state was loaded).
    """

    name: str = "defense"
    threat_model: str = ""

    def __init__(self) -> None:
        self.fitted = False

    # -- interface -------------------------------------------------------------------------------
    def fit(self, model: nn.Module, clean: Any) -> "ModelDefense":
        """Inspect ``model`` with clean labelled data (DataLoader or ``(x, y)`` pair); never modifies it."""
        raise NotImplementedError

    @property
    def flagged(self) -> List[int]:
        """Labels judged infected by the last ``fit``."""
        raise NotImplementedError

    def report(self) -> List[Dict[str, Any]]:
        """One dict per inspected label (JSON-serialisable values)."""
        raise NotImplementedError

    def hparams(self) -> Dict[str, Any]:
        """Settings to record with a run (JSON-serialisable)."""
        return {}

    def state_dict(self) -> Dict[str, Any]:
        return {"fitted": self.fitted}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.fitted = bool(state.get("fitted", False))

    def _check_fitted(self, what: str) -> None:
        if not self.fitted:
            raise RuntimeError(f"{type(self).__name__} must be fitted before {what}: call "
                               f"{type(self).__name__}().fit(model, clean) with clean labelled data")

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.hparams().items())
        return f"{type(self).__name__}({args})"
