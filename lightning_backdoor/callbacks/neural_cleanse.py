"""``NeuralCleanseCallback``: inspect the trained model with Neural Cleanse and log what it finds."""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Union

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader

from ..defenses.neural_cleanse import NeuralCleanse
from ..models.outputs import check_output_key
from ..validation import check_bool, check_positive_int
from ._evaluation import EvaluationEndHooks, log_once
from .detection import resolve_net

_WHEN = ("fit_end", "validate", "test")
_PREFIX = {"fit_end": "fit", "validate": "val", "test": "test"}


class NeuralCleanseCallback(EvaluationEndHooks, Callback):
    """Runs :class:`~lightning_backdoor.defenses.NeuralCleanse` on the trained model and logs the verdict.

    Works in any Lightning training whose module's forward (or ``module.net``) returns logits for
    pixel-space images. The clean images come from ``clean_loader`` or the data module's held-apart
    ``defense_dataloader()``. The model is inspected, never modified (eval mode inside, modes restored,
    no gradient accumulated in its parameters).

    Logged keys, per ``stage`` in ``fit`` (end of fit), ``val``, ``test``:

    - ``{stage}/neural_cleanse/anomaly_index``: the largest MAD anomaly index among labels whose mask
      norm is below the median (0 when none is);
    - ``{stage}/neural_cleanse/flagged``: the number of flagged labels (small-side index > 2);
    - ``{stage}/neural_cleanse/l1/{label}``: each label's reversed mask L1 norm;
    - ``{stage}/neural_cleanse/target_flagged``: 1.0 if the attack's target label (``target`` or the data
      module's) is flagged, else 0.0 (only when a target is known);
    - to W&B loggers: ``{stage}/neural_cleanse/masks`` and ``/patterns`` (one image per label, captioned
      with label, norm and index) and ``{stage}/neural_cleanse/labels``, a ``wandb.Table`` with columns
      ``label, l1, anomaly_index, asr, found, flagged, steps``.

    When: at the end of ``fit`` (``"fit_end"``; logged straight to the loggers at the last global
    step), after validation every ``every_n_epochs`` epochs (``"validate"``) and at the end of each
    test run (``"test"``: in the test results, once, like :class:`DetectionCallback`).

    State: the last fitted Neural Cleanse (masks, patterns, norms, ...) is saved in checkpoints
    (``state_dict``; tensors only, loadable with ``weights_only=True``) and restored with them;
    ``cleanse`` holds it, ``last_results`` the logged values.

    Args:
        cleanse: the configured :class:`~lightning_backdoor.defenses.NeuralCleanse` (default: its defaults).
        when: any of ``"fit_end"``, ``"validate"``, ``"test"``.
        every_n_epochs: for ``"validate"``, run every n epochs.
        clean_loader: clean labelled images (default: the data module's ``defense_dataloader()``).
        target: the attack's target label for ``target_flagged`` (default: the data module's).
        model_attr / output_key: what the inspected classifier is (see :class:`DetectionCallback`).
        images: log masks/patterns and the table to W&B loggers.
        progress: show a progress bar over the optimisation (only when the Trainer shows progress bars).
        name: distinguishes the checkpoint state of two such callbacks.
    """

    def __init__(
        self,
        cleanse: Optional[NeuralCleanse] = None,
        when: Sequence[str] = ("fit_end", "test"),
        every_n_epochs: int = 1,
        clean_loader: Optional[DataLoader] = None,
        target: Optional[int] = None,
        model_attr: Optional[str] = None,
        output_key: Union[str, int, None] = None,
        images: bool = True,
        progress: bool = True,
        name: Optional[str] = None,
    ) -> None:
        cleanse = NeuralCleanse() if cleanse is None else cleanse
        if not isinstance(cleanse, NeuralCleanse):
            raise TypeError(f"cleanse must be a NeuralCleanse instance or None, got {type(cleanse).__name__}")
        when = (when,) if isinstance(when, str) else tuple(when)
        if not when or any(w not in _WHEN for w in when):
            raise ValueError(f"when must be a non-empty subset of {list(_WHEN)}, got {list(when)}")
        if target is not None:
            check_positive_int(target, "target", allow_zero=True)
        if name is not None and not isinstance(name, str):
            raise TypeError(f"name must be a str or None, got {name!r}")
        self.cleanse = cleanse
        self.when = when
        self.every_n_epochs = check_positive_int(every_n_epochs, "every_n_epochs")
        self.clean_loader, self.target = clean_loader, target
        self.model_attr, self.output_key = model_attr, check_output_key(output_key)
        self.images, self.progress = check_bool(images, "images"), check_bool(progress, "progress")
        self.name = name
        self.last_results: Dict[str, float] = {}

    @property
    def state_key(self) -> str:
        return self._generate_state_key(name=self.name)

    def state_dict(self) -> Dict[str, Any]:
        return {"cleanse": self.cleanse.state_dict()}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        if "cleanse" in state_dict:
            self.cleanse.load_state_dict(state_dict["cleanse"])

    # -- hooks -----------------------------------------------------------------------------------
    def _should_run(self, trainer: Trainer, stage: str) -> bool:
        if stage not in self.when:
            return False
        if stage == "validate" and trainer.state.fn == "fit":
            return (trainer.current_epoch + 1) % self.every_n_epochs == 0
        return True

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if "fit_end" in self.when:
            values = self._inspect(trainer, pl_module, "fit_end")
            if values:
                for lg in trainer.loggers:
                    lg.log_metrics(values, step=trainer.global_step)

    def _run(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        values = self._inspect(trainer, pl_module, stage)
        if values:
            log_once(pl_module, values)

    # -- work ------------------------------------------------------------------------------------
    def _loader(self, trainer: Trainer) -> Optional[DataLoader]:
        if self.clean_loader is not None:
            return self.clean_loader
        dm = getattr(trainer, "datamodule", None)
        if dm is not None and hasattr(dm, "defense_dataloader") and getattr(dm, "defense_size", 0):
            return dm.defense_dataloader()
        return None

    def _target(self, trainer: Trainer) -> Optional[int]:
        if self.target is not None:
            return int(self.target)
        dm = getattr(trainer, "datamodule", None)
        return int(dm.target) if dm is not None and getattr(dm, "attack", None) is not None else None

    def _inspect(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> Dict[str, float]:
        prefix = f"{_PREFIX[stage]}/neural_cleanse"
        loader = self._loader(trainer)
        if loader is None:
            rank_zero_warn(f"NeuralCleanseCallback: no clean data for {prefix} (pass clean_loader= or use a "
                           "BackdoorDataModule with defense_size > 0); skipping Neural Cleanse")
            return {}
        net = resolve_net(pl_module, self.model_attr, self.output_key)
        bar = self._bar(trainer, prefix)
        try:
            self.cleanse.fit(net, loader, progress=bar.update if bar is not None else None)
        finally:
            if bar is not None:
                bar.close()
        values: Dict[str, float] = {
            f"{prefix}/anomaly_index": self.cleanse.max_anomaly(),
            f"{prefix}/flagged": float(len(self.cleanse.flagged)),
        }
        for t, l1 in zip(self.cleanse.labels.tolist(), self.cleanse.l1.tolist()):
            values[f"{prefix}/l1/{t}"] = float(l1)
        target = self._target(trainer)
        if target is not None:
            values[f"{prefix}/target_flagged"] = float(target in self.cleanse.flagged)
        if self.images:
            self._log_images(trainer, prefix)
        self.last_results = values
        return values

    def _bar(self, trainer: Trainer, prefix: str) -> Any:
        if not self.progress or getattr(trainer, "progress_bar_callback", None) is None or trainer.global_rank != 0:
            return None
        try:
            from tqdm.auto import tqdm
        except ImportError:  # pragma: no cover
            return None
        return tqdm(total=self.cleanse.total_steps(), desc=f"{prefix} (reverse-engineering)", leave=False,
                    dynamic_ncols=True)

    def _log_images(self, trainer: Trainer, prefix: str) -> None:
        from lightning.pytorch.loggers import WandbLogger

        loggers = [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]
        if not loggers or trainer.global_rank != 0:
            return
        try:
            import wandb

            rows = self.cleanse.report()
            captions = [f"label {r['label']}: l1 {r['l1']:.2f}, index {r['anomaly_index']:.2f}"
                        + (" (flagged)" if r["flagged"] else "") for r in rows]
            masks = [_to_image(m) for m in self.cleanse.masks]
            patterns = [_to_image(p) for p in self.cleanse.patterns]
            columns = ["label", "l1", "anomaly_index", "asr", "found", "flagged", "steps"]
            table = wandb.Table(columns=columns, data=[[r[c] for c in columns] for r in rows])
            step = trainer.global_step
            for lg in loggers:
                lg.log_image(key=f"{prefix}/masks", images=masks, step=step, caption=captions)
                lg.log_image(key=f"{prefix}/patterns", images=patterns, step=step, caption=captions)
                lg.experiment.log({f"{prefix}/labels": table, "trainer/global_step": step})
        except Exception as e:  # images must never break training
            rank_zero_warn(f"NeuralCleanseCallback: could not log images for {prefix}: {e!r}")


def _to_image(t: torch.Tensor) -> Any:
    """``[C, H, W]`` in [0, 1] → a uint8 ``H x W`` (or ``H x W x 3``) numpy array for W&B."""
    a = (t.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu()
    return a[0].numpy() if a.shape[0] == 1 else a.permute(1, 2, 0).numpy()


__all__: List[str] = ["NeuralCleanseCallback"]
