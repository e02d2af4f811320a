"""``BackdoorMetrics``: benign accuracy and attack success rate for any LightningModule."""

from __future__ import annotations

from typing import Any, Dict, Optional, Sequence, Union

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader

from ..batch import parse_batch
from ..metrics.backdoor import AttackSuccessRate, BenignAccuracy
from ..models.outputs import check_logits, check_output_key
from ..utils import evaluating
from ..validation import check_optional_positive_int, check_positive_int, check_seed
from ._evaluation import EvaluationEndHooks, device_trigger, log_once, rank_and_world, shard
from .detection import resolve_net

_PREFIX = {"validate": "val", "test": "test"}


class BackdoorMetrics(EvaluationEndHooks, Callback):
    """Logs ``{stage}/ba`` and ``{stage}/asr`` for a LightningModule that is not ours.

    At the end of each validation/test run (once, after the last evaluation batch) it runs the model
    (``module.net`` if present, else the module: its forward must return logits, or name them with
    ``output_key``) over a clean and a poisoned loader — given here, or the
    :class:`~lightning_backdoor.data.BackdoorDataModule`'s — and logs BA and ASR as torchmetrics with
    summed counters (DDP-correct; each sample counted once). Use it when your module's own
    validation step does not compute them; :class:`~lightning_backdoor.modules.BackdoorClassifier`
    already does.

    Batches are read like everywhere else (:func:`~lightning_backdoor.batch.parse_batch`): ``(x, y)``
    tuples, ``Sample`` batches ``(x, y, poisoned, original_y, index)`` or dicts. For the poisoned
    loader the *true* label counts (``original_y``, or ``y`` of an ``(x, y)`` batch): ASR is measured
    over the inputs whose true label is not the target. A set left empty (an empty loader, or a
    poisoned set whose every true label is the target) gives a warning and no value, never NaN.

    A batch-level attack's poisoned set (:class:`~lightning_backdoor.data.DeviceTriggerSet`) gets the module's
    current trigger applied on the device (``pl_module.batch_attack``, else the data module's attack).

    Logged keys: ``{prefix}/ba`` and ``{prefix}/asr`` with ``prefix`` the template below.

    Args:
        clean_loader / poisoned_loader: loaders of batches with ``x`` in ``[0, 1]``.
        target: the target label (default: the data module's).
        stages: ``"validate"``, ``"test"`` or both.
        max_samples: cap per loader (None: all); a seeded random sample, never the first samples.
        model_attr: attribute of the LightningModule holding the classifier.
        output_key: selects the logits when the model returns a tuple/dict/object (``0``, ``"logits"``).
        prefix: metric prefix template (default ``{stage}``), e.g. ``"backdoor/{stage}"``.
        seed: seeds the capped subsets.
    """

    def __init__(
        self,
        clean_loader: Optional[DataLoader] = None,
        poisoned_loader: Optional[DataLoader] = None,
        target: Optional[int] = None,
        stages: Union[str, Sequence[str]] = ("validate", "test"),
        max_samples: Optional[int] = None,
        model_attr: Optional[str] = None,
        output_key: Union[str, int, None] = None,
        prefix: str = "{stage}",
        seed: int = 0,
    ) -> None:
        if isinstance(stages, str):
            stages = (stages,)  # "test" means one stage, not the letters of it
        for s in stages:
            if s not in _PREFIX:
                raise ValueError(f"stages must be a subset of {list(_PREFIX)}, got {list(stages)}")
        if not stages:
            raise ValueError(f"stages must name at least one of {list(_PREFIX)}, got []")
        if target is not None:
            check_positive_int(target, "target", allow_zero=True)
        if not isinstance(prefix, str) or "{stage}" not in prefix:
            raise ValueError(f"prefix must be a str template containing '{{stage}}', got {prefix!r}")
        self.clean_loader, self.poisoned_loader = clean_loader, poisoned_loader
        self.target, self.stages = target, tuple(stages)
        self.max_samples = check_optional_positive_int(max_samples, "max_samples")
        self.model_attr, self.output_key, self.prefix = model_attr, check_output_key(output_key), prefix
        self.seed = check_seed(seed)
        self.last_results: Dict[str, float] = {}

    def _should_run(self, trainer: Trainer, stage: str) -> bool:
        return stage in self.stages

    def _run(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        clean, poisoned = self.clean_loader, self.poisoned_loader
        dm = getattr(trainer, "datamodule", None)
        if dm is not None and hasattr(dm, "eval_dataloaders"):
            c, p = dm.eval_dataloaders(stage)
            clean, poisoned = clean or c, poisoned or p
        target = self.target if self.target is not None else (
            int(dm.target) if dm is not None and getattr(dm, "attack", None) is not None else None)
        name = self.prefix.format(stage=_PREFIX[stage])
        net, device = resolve_net(pl_module, self.model_attr, self.output_key), pl_module.device
        rank, world = rank_and_world(trainer)
        values: Dict[str, float] = {}
        if clean is not None:
            ba = BenignAccuracy().to(device)
            self._accumulate(net, clean, rank, world, device, lambda logits, b: ba.update(logits, b.y.to(device)))
            if self._global_count(ba.total) == 0:
                rank_zero_warn(f"BackdoorMetrics: the clean loader of stage {stage!r} holds no samples; {name}/ba "
                               "is not logged (pass a non-empty clean_loader)")
            else:
                values[f"{name}/ba"] = float(ba.compute())
        if poisoned is not None:
            if target is None:
                rank_zero_warn("BackdoorMetrics: a poisoned loader needs target=<label>; skipping ASR")
            else:
                asr = AttackSuccessRate(target).to(device)
                self._accumulate(net, poisoned, rank, world, device,
                                 lambda logits, b: asr.update(logits, b.original_y.to(device)),
                                 transform=device_trigger(poisoned, pl_module, trainer))
                if self._global_count(asr.total) == 0:
                    rank_zero_warn(
                        f"BackdoorMetrics: no sample of the poisoned loader of stage {stage!r} has a true label other "
                        f"than the target {target}, so {name}/asr is undefined and not logged. ASR counts triggered "
                        "inputs whose TRUE label is not the target: give (x, true_y) batches or "
                        "(x, y, poisoned, original_y) ones")
                else:
                    values[f"{name}/asr"] = float(asr.compute())
        log_once(pl_module, values)
        self.last_results = values

    @staticmethod
    def _global_count(total: torch.Tensor) -> int:
        """Samples counted over every rank (called on every rank: this rank may hold none under DDP)."""
        t = total.detach().clone()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(t)
        return int(t)

    def _accumulate(self, net, loader, rank, world, device, update, transform=None) -> None:
        if not hasattr(loader, "dataset") or not hasattr(loader.dataset, "__len__") or len(loader.dataset) == 0:
            return
        sub, _ = shard(loader, rank, world, self.max_samples, seed=self.seed)
        with evaluating(net), torch.no_grad():
            for batch in sub:
                b = parse_batch(batch, require_labels=True)
                x = b.x.to(device)
                x = transform(x) if transform is not None else x  # a batch attack's trigger, on the device
                update(check_logits(net(x), "the model (BackdoorMetrics)"), b)

    def state_dict(self) -> Dict[str, Any]:
        return {}
