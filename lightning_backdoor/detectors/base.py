"""The common interface of input-level backdoor detectors.

    det = create_detector("scale_up")
    det.fit(model, benign)          # benign: a DataLoader or an (x, y) pair; a no-op where not needed
    scores = det.score(model, x)    # float Tensor[N]; higher = more likely poisoned; x in [0, 1]
    flags = det.predict(model, x)   # bool Tensor[N]: scores > threshold

Detectors are plain objects holding settings and fitted state (no model reference is kept). Their
fitted state round-trips through ``state_dict`` / ``load_state_dict`` with tensors and plain
Python values only, so it can be stored in a checkpoint and loaded with ``weights_only=True``.

The contract every detector keeps (tests/detectors/test_contract.py runs it over the registry):

- inputs are images in pixel space ``[0, 1]`` (a normalised batch is refused with a hint); they are
  moved to the model's device and cast to its floating dtype, and never modified;
- the model must return logits ``[N, K]``, ``K >= 2`` (other outputs are refused by
  :func:`~lightning_backdoor.models.check_logits` with the ``output_key=`` / ``LogitsOf`` that
  would adapt them);
- scores are a float ``Tensor[N]``, higher = more likely poisoned;
- the model's modes, parameters and buffers and the caller's global RNG are left untouched;
  randomised detectors seed per sample id (``accepts_sample_ids``), so scores do not depend on
  batching or on the DDP rank.
"""

from __future__ import annotations

from typing import Any, Dict, Iterable, Tuple

import math

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, IterableDataset

from ..validation import check_images, check_real
from ..registry import Registry
from ..batch import parse_batch
from ..utils import model_device, model_dtype, random_subset, subset_loader

DETECTORS = Registry("detector")


def create_detector(name: str, **kwargs: Any) -> "Detector":
    """Build a registered detector by name, e.g. ``create_detector("ibd_psc", omega=1.5)``."""
    return DETECTORS.create(name, **kwargs)


def list_detectors(pattern: str = "*") -> list[str]:
    """Names of registered detectors matching an fnmatch ``pattern``."""
    return DETECTORS.list(pattern)


class Detector:
    """Base class. Subclasses set ``name`` and implement ``score`` (and ``fit`` when they need data).

    Attributes:
        name: registry key and metric-name component (``test/{name}/auroc``).
        threshold: scores strictly above it are flagged poisoned by ``predict``.
        requires_fit: whether ``score`` needs ``fit`` first (data-limited detectors).
        accepts_sample_ids: whether ``score`` takes per-input ``sample_ids`` seeding its randomness.
        threat_model: short description for docs and run metadata.
    """

    name: str = "detector"
    requires_fit: bool = False
    threat_model: str = ""
    #: Randomised detectors set this and accept ``score(model, x, sample_ids=...)``: each input's
    #: randomness then depends only on its id, so scores do not depend on batching or on which DDP
    #: rank scores the input (the detection callback passes ids derived from sample positions).
    accepts_sample_ids: bool = False

    def __init__(self, threshold: float = 0.5) -> None:
        self.threshold = float(threshold) if isinstance(threshold, float) and math.isnan(threshold) else check_real(
            threshold, "threshold")
        self.fitted = False

    # -- interface -------------------------------------------------------------------------------
    def fit(self, model: nn.Module, benign: Any) -> "Detector":
        """Fit on benign data (DataLoader or ``(x, y)`` pair). Default: nothing to fit."""
        self.fitted = True
        return self

    def score(self, model: nn.Module, x: Tensor) -> Tensor:
        raise NotImplementedError

    def predict(self, model: nn.Module, x: Tensor) -> Tensor:
        return self.score(model, x) > self.threshold

    def hparams(self) -> Dict[str, Any]:
        """Settings to record with a run (JSON-serialisable)."""
        return {"threshold": self.threshold}

    def state_dict(self) -> Dict[str, Any]:
        return {"fitted": self.fitted}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.fitted = bool(state.get("fitted", False))

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.hparams().items())
        return f"{type(self).__name__}({args})"

    # -- helpers for subclasses ------------------------------------------------------------------
    def _check_fitted(self) -> None:
        if self.requires_fit and not self.fitted:
            raise RuntimeError(
                f"{type(self).__name__} must be fitted on benign data before scoring: "
                f"call det.fit(model, benign) with a DataLoader or an (x, y) pair"
            )

    @staticmethod
    def _check_input(model: nn.Module, x: Any, name: str = "x") -> Tensor:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        x = check_images(x, name, allow_single=True)
        if x.dim() == 3:
            x = x.unsqueeze(0)
        in_ch = getattr(model, "in_channels", None)
        if isinstance(in_ch, int) and not isinstance(in_ch, bool) and x.shape[1] != in_ch:
            raise ValueError(f"{name} has {x.shape[1]} channels but the model expects in_channels={in_ch}; "
                             f"got images of shape {tuple(x.shape)}")
        # adaptation, documented in the contract: inputs follow the model's device and floating dtype
        return x.to(device=model_device(model), dtype=model_dtype(model))


def threshold_at_fpr(benign_scores: Tensor, target_fpr: float) -> float:
    """A threshold from benign scores such that at most ``floor(target_fpr * N)`` of them are
    strictly above it (the empirical ``1 - target_fpr`` quantile), i.e. FPR on these scores is
    ``<= target_fpr`` under ``predict``'s ``score > threshold`` rule."""
    scores = benign_scores.detach().flatten().float()
    if scores.numel() == 0:
        raise ValueError("cannot set a threshold from an empty set of benign scores")
    if not bool(torch.isfinite(scores).all()):
        raise ValueError("benign scores contain NaN or Inf; cannot set a threshold from them")
    n = scores.numel()
    allowed = int(target_fpr * n + 1e-9)  # benign scores allowed strictly above the threshold
    k = max(0, n - 1 - allowed)
    return float(scores.sort().values[k])


def iter_benign(benign: Any, device: torch.device | None = None) -> Iterable[Tuple[Tensor, Tensor]]:
    """Yield labelled ``(x, y)`` batches from a DataLoader/iterable of batches or a single ``(x, y)`` pair.

    Batches are read with :func:`~lightning_backdoor.batch.parse_batch` (tuples, dicts, ``Sample``).
    """
    if isinstance(benign, (tuple, list)) and len(benign) == 2 and all(isinstance(t, Tensor) for t in benign):
        batches: Iterable[Any] = [benign]
    elif isinstance(benign, Tensor):
        raise TypeError("benign must be a DataLoader or an (x, y) pair of tensors; labels are needed")
    elif not hasattr(benign, "__iter__"):
        raise TypeError(f"benign must be a DataLoader, an iterable of (x, y, ...) batches or an (x, y) pair, "
                        f"got {type(benign).__name__}")
    else:
        batches = benign
    n = 0
    for batch in batches:
        b = parse_batch(batch)
        if b.y is None:
            raise ValueError("benign batches must carry labels: (x, y, ...) tuples or dicts with 'y'")
        x, y = b.x, b.y
        check_images(x, "benign images", allow_single=False)
        if device is not None:
            x, y = x.to(device), y.to(device)
        n += len(x)
        yield x, y.long()
    if n == 0:
        raise ValueError("benign data is empty; pass a non-empty DataLoader or (x, y) pair")


def collect_benign(
    benign: Any, device: torch.device | None = None, max_samples: int | None = None, seed: int = 0
) -> Tuple[Tensor, Tensor]:
    """Concatenate benign data into one ``(x, y)`` pair, capped at a seeded random sample of ``max_samples``.

    The cap never takes "the first ``max_samples``" (a class-sorted loader would give one class): from
    an ``(x, y)`` pair or a DataLoader over a sized map-style dataset, only the sampled items are
    read; from any other iterable everything is read and then sampled. The sample depends only on
    ``(size, max_samples, seed)``, so every DDP rank fits on the same samples.
    """
    if max_samples is not None and isinstance(benign, DataLoader):
        ds = benign.dataset
        if hasattr(ds, "__len__") and not isinstance(ds, IterableDataset) and len(ds) > max_samples:
            benign = subset_loader(benign, random_subset(len(ds), max_samples, seed))
    xs, ys = [], []
    for x, y in iter_benign(benign, device):
        xs.append(x)
        ys.append(y)
    x, y = torch.cat(xs), torch.cat(ys)
    if max_samples is not None and len(x) > max_samples:
        keep = random_subset(len(x), max_samples, seed).to(x.device)
        x, y = x[keep], y[keep]
    return x, y
