"""``BackdoorMetrics``: benign accuracy and attack success rate for any LightningModule."""

from __future__ import annotations

from typing import Dict, Optional, Sequence

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader

from ..batch import parse_batch
from ..metrics.backdoor import AttackSuccessRate, BenignAccuracy
from ..utils import evaluating
from ._evaluation import rank_and_world, shard
from .detection import resolve_net

_PREFIX = {"validate": "val", "test": "test"}


class BackdoorMetrics(Callback):
    """Logs ``{stage}/ba`` and ``{stage}/asr`` for a LightningModule that is not ours.

    At the end of each validation/test epoch it runs the model (``module.net`` if present, else the
    module: its forward must return logits) over a clean and a poisoned loader — given here, or the
    :class:`~lightning_backdoor.data.BackdoorDataModule`'s — and logs BA and ASR as torchmetrics with
    summed counters (DDP-correct; each sample counted once). Use it when your module's own
    validation step does not compute them; :class:`~lightning_backdoor.modules.BackdoorClassifier`
    already does.

    Args:
        clean_loader / poisoned_loader: loaders of ``(x, y, ...)`` batches with ``x`` in ``[0, 1]``;
            for the poisoned one, a third element ``poisoned`` is ignored and the fourth, if present,
            is the true label (samples whose true label is the target are excluded).
        target: the target label (default: the data module's).
        stages: any of ``"validate"``, ``"test"``.
        max_samples: cap per loader (None: all).
        prefix: metric prefix template (default ``{stage}``), e.g. ``"backdoor/{stage}"``.
    """

    def __init__(
        self,
        clean_loader: Optional[DataLoader] = None,
        poisoned_loader: Optional[DataLoader] = None,
        target: Optional[int] = None,
        stages: Sequence[str] = ("validate", "test"),
        max_samples: Optional[int] = None,
        model_attr: Optional[str] = None,
        prefix: str = "{stage}",
    ) -> None:
        for s in stages:
            if s not in _PREFIX:
                raise ValueError(f"stages must be a subset of {list(_PREFIX)}, got {list(stages)}")
        self.clean_loader, self.poisoned_loader = clean_loader, poisoned_loader
        self.target, self.stages, self.max_samples = target, tuple(stages), max_samples
        self.model_attr, self.prefix = model_attr, prefix
        self.last_results: Dict[str, float] = {}

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if "validate" in self.stages and not trainer.sanity_checking:
            self._run(trainer, pl_module, "validate")

    def on_test_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if "test" in self.stages:
            self._run(trainer, pl_module, "test")

    def _run(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        clean, poisoned = self.clean_loader, self.poisoned_loader
        dm = getattr(trainer, "datamodule", None)
        if dm is not None and hasattr(dm, "eval_dataloaders"):
            c, p = dm.eval_dataloaders(stage)
            clean, poisoned = clean or c, poisoned or p
        target = self.target if self.target is not None else (
            int(dm.target) if dm is not None and getattr(dm, "attack", None) is not None else None)
        name = self.prefix.format(stage=_PREFIX[stage])
        net, device = resolve_net(pl_module, self.model_attr), pl_module.device
        rank, world = rank_and_world(trainer)
        values: Dict[str, float] = {}
        if clean is not None:
            ba = BenignAccuracy().to(device)
            self._accumulate(net, clean, rank, world, device, lambda logits, b: ba.update(logits, b.y.to(device)))
            values[f"{name}/ba"] = float(ba.compute())
        if poisoned is not None:
            if target is None:
                rank_zero_warn("BackdoorMetrics: a poisoned loader needs target=<label>; skipping ASR")
            else:
                asr = AttackSuccessRate(target).to(device)

                self._accumulate(net, poisoned, rank, world, device,
                                 lambda logits, b: asr.update(logits, b.original_y.to(device)))
                values[f"{name}/asr"] = float(asr.compute())
        for key, val in values.items():
            pl_module.log(key, val, sync_dist=False)
        self.last_results = values

    def _accumulate(self, net, loader, rank, world, device, update) -> None:
        sub, _ = shard(loader, rank, world, self.max_samples)
        with evaluating(net), torch.no_grad():
            for batch in sub:
                b = parse_batch(batch, require_labels=True)
                update(net(b.x.to(device)), b)
