"""``ModelEditCallback``: apply a model-edit attack (SRA) to the model a fit has just trained."""

from __future__ import annotations

import os
from typing import Any, Dict, Optional

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info

from ..attacks.base import Attack
from ..attacks.model_edit import ModelEditAttack
from ..validation import check_positive_int


class ModelEditCallback(Callback):
    """At the end of ``fit``, edits the trained ``pl_module.net`` with a model-edit attack, so that the test that
    follows (``test_after_fit``, a matrix cell) evaluates — BA, ASR, the detectors — the backdoored model.

    The fit itself trains a **clean** model (give the data module ``attack=None``); the attack's trigger
    (``attack.trigger``, a dataset-level :class:`~lightning_backdoor.attacks.Attack`) becomes the data
    module's evaluation attack (:meth:`~lightning_backdoor.data.BackdoorDataModule.set_eval_attack`): the
    poisoned validation/test sets are built with it, the training set stays clean. The edited weights are
    written into the module in place (same tensors, same device). This is the matrix's way to run SRA as
    a cell (``attacks: {sra: {trainer.callbacks+: ...}}``); ``lightning-backdoor sra`` edits an existing
    checkpoint instead.

    Logged (as hyperparameters, once): ``edit/{name}/*`` — the attack's report (channels, subnet outputs).

    Args:
        attack: the model-edit attack, e.g. ``SRA(trigger=BadNets(), width=1)``.
        target: the target label (default: the data module's ``target``).
        save_path: also write a checkpoint of the edited model here (``trainer.save_checkpoint``).
        max_samples: clean training images given to the attack (a seeded random subset).

    Example:
        >>> from lightning_backdoor.attacks import SRA, BadNets
        >>> cb = ModelEditCallback(SRA(trigger=BadNets(), steps=100))
    """

    def __init__(self, attack: ModelEditAttack, target: Optional[int] = None, save_path: Optional[str] = None,
                 max_samples: Optional[int] = None) -> None:
        if not isinstance(attack, ModelEditAttack):
            raise TypeError(f"attack must be a lightning_backdoor.attacks.ModelEditAttack (e.g. SRA(...)), got "
                            f"{type(attack).__name__}")
        if not isinstance(getattr(attack, "trigger", None), Attack):
            raise ValueError(f"attack {attack.name!r} needs a dataset-level trigger (e.g. SRA(trigger=BadNets())) for "
                             "the poisoned evaluation sets")
        if target is not None:
            check_positive_int(target, "target", allow_zero=True)
        self.attack, self.target, self.save_path = attack, target, save_path
        self.max_samples = None if max_samples is None else check_positive_int(max_samples, "max_samples")
        self.report: Dict[str, Any] = {}

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        dm = getattr(trainer, "datamodule", None)
        net = getattr(pl_module, "net", None)
        if dm is None or not hasattr(dm, "set_eval_attack") or net is None:
            raise RuntimeError("ModelEditCallback needs a BackdoorDataModule and a module with .net (BackdoorClassifier)")
        if getattr(dm, "attack", None) is not None:
            raise ValueError(f"ModelEditCallback edits a CLEAN model, but the data module poisons its training set with "
                             f"{getattr(dm.attack, 'name', dm.attack)!r}; give the data module attack=None")
        target = int(self.target if self.target is not None else dm.target)
        base = getattr(dm.train_set, "dataset", dm.train_set)  # clean training images
        if self.max_samples is not None:
            self.attack.max_samples = self.max_samples
        edited = self.attack.edit(net, base, target)
        with torch.no_grad():
            net.load_state_dict(edited.state_dict())
        dm.set_eval_attack(self.attack.trigger)
        if getattr(pl_module, "target", None) is None or pl_module.target != target:
            pl_module.target = target
        self.report = dict(self.attack.report)
        flat = {f"edit/{self.attack.name}/{k}": v for k, v in self.report.items()
                if isinstance(v, (int, float, str, bool)) or v is None}
        for logger in trainer.loggers:
            logger.log_hyperparams(flat)
        rank_zero_info(f"ModelEditCallback: {self.attack.name} written into the trained model "
                       f"(channels {self.report.get('channels')}, target {target})")
        if self.save_path:
            os.makedirs(os.path.dirname(os.path.abspath(self.save_path)), exist_ok=True)
            trainer.save_checkpoint(self.save_path, weights_only=False)

    def state_dict(self) -> Dict[str, Any]:
        return {}
