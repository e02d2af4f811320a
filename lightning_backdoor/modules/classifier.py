"""``BackdoorClassifier``: a LightningModule that trains a (possibly poisoned) image classifier."""

from __future__ import annotations

import os
import warnings
from typing import Any, Dict, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from ..attacks.batch_base import BatchAttack
from ..batch import parse_batch
from ..checkpoints import load_net_weights
from ..metrics.backdoor import AttackSuccessRate, BenignAccuracy
from ..models.outputs import LogitsOf, check_logits, check_output_key, select_output
from ..utils import model_dtype, per_sample_normal
from ..validation import check_images, check_positive_float, check_positive_int, check_seed


def noise_key(sigma: float) -> str:
    """Metric-name suffix of a noise level: ``asr@noise0.05``."""
    return f"asr@noise{sigma:g}"


class BackdoorClassifier(LightningModule):
    """Trains ``net`` on (poisoned) data and logs benign accuracy and attack success rate.

    Logged keys: ``train/loss`` (total), ``train/loss/bd`` (the vanilla objective),
    ``train/loss/{term.name}`` for each extra loss term, ``{stage}/ba``, ``{stage}/asr`` and
    ``{stage}/asr@noise{σ}`` for each ``noise_sigmas`` value (``stage`` in ``val``, ``test``).
    BA/ASR are torchmetrics with summed counters (correct under DDP).
    At fit start, when the data module sanitised the training set (``BackdoorDataModule(sanitizer=...)``),
    ``train/sanitiser/{precision,recall,auroc,removed,clean_removed}`` (docs/sanitizers.md).
    Once per run (at the start of a fit from step 0, not again on resume), W&B loggers get
    ``attack/trigger_grid``: an image of clean / poisoned / difference rows (plus the training-time
    trigger and clean-image transform where the attack has them) of 8 seeded test images, for the
    data module's attack (:mod:`lightning_backdoor.attacks.preview`).

    Validation/test loaders are ``[clean, poisoned]`` as built by
    :class:`~lightning_backdoor.data.BackdoorDataModule` (dataloader 0: BA, 1: ASR).

    Args:
        net: any ``nn.Module`` mapping ``[0, 1]`` images to logits (normalisation inside).
        optimizer: a callable ``params -> Optimizer`` (LightningCLI: ``class_path`` + ``init_args``).
        scheduler: optional callable ``optimizer -> LRScheduler`` (stepped per epoch).
        losses: extra loss terms (adaptive attacks, :mod:`lightning_backdoor.losses`): the total is
            ``prod(term.main_weight) * L_bd + sum(term(...))``.
        target: the target label (default: the data module's ``target``).
        noise_sigmas: Gaussian input-noise levels for ``asr@noise{σ}`` (SCALE-UP's robustness check).
        noise_seed: seeds that noise (a local generator; the global RNG is untouched).
        init_weights: path of a checkpoint whose network weights ``net`` starts from (fine-tuning,
            e.g. an adaptive attack on a vanilla-trained backdoored model): a Lightning ``.ckpt``
            (its ``net.*`` weights) or a file of ``net.state_dict()``. Loaded in ``setup`` with
            ``torch.load(..., map_location="cpu", weights_only=True)`` by
            :func:`~lightning_backdoor.checkpoints.load_net_weights`; a missing file, a file refused by
            ``weights_only`` loading or a network mismatch (missing/unexpected keys, shape mismatches)
            is an error. Only the weights are taken: the optimiser, scheduler, epoch and step counters
            start fresh. This is fine-tuning, not resuming — to resume a run, pass the run's own
            checkpoint to ``fit --ckpt_path`` (then ``init_weights`` is skipped). Loaded once per
            module: ``test`` after ``fit`` and modules restored from a checkpoint keep their weights.
        output_key: selects the logits when the net returns a tuple/dict/object.
        batch_attack: a :class:`~lightning_backdoor.attacks.BatchAttack` (IAD) poisoning every training
            batch on the device (default: the data module's ``attack`` when it is one). With a batch
            attack the module uses manual optimisation (so no ``gradient_clip_val``): ``optimizer``/``scheduler`` are the
            classifier's, the attack brings its own (docs/attacks_training.md); the classifier's
            optimiser sees only ``net`` (and loss-term) parameters. Extra logged keys:
            ``train/loss/attack`` and ``train/loss/pretrain`` (the attack's pre-training phase). The
            attack's parts are submodules: saved in every checkpoint and restored on resume and by
            ``load_from_checkpoint`` (rebuilt from the recorded name and arguments when not given).

    Example:
        >>> from lightning_backdoor.models import create_model
        >>> module = BackdoorClassifier(create_model("resnet20", num_classes=10, in_channels=1))  # doctest: +SKIP
    """

    def __init__(
        self,
        net: nn.Module,
        optimizer: OptimizerCallable = torch.optim.Adam,
        scheduler: Optional[LRSchedulerCallable] = None,
        losses: Sequence[nn.Module] = (),
        target: Optional[int] = None,
        noise_sigmas: Sequence[float] = (),
        noise_seed: int = 0,
        init_weights: Optional[str] = None,
        output_key: Union[str, int, None] = None,
        batch_attack: Optional[BatchAttack] = None,
    ) -> None:
        super().__init__()
        if batch_attack is not None and not isinstance(batch_attack, BatchAttack):
            raise TypeError(f"batch_attack must be a lightning_backdoor.attacks.BatchAttack (e.g. IAD()) or None, got "
                            f"{type(batch_attack).__name__}; dataset-level attacks go to BackdoorDataModule(attack=...)")
        self.batch_attack = batch_attack
        self._attack_phases: list = []
        if not isinstance(net, nn.Module):
            raise TypeError(f"net must be a torch.nn.Module, got {type(net).__name__}")
        for s in noise_sigmas:
            check_positive_float(s, "noise_sigmas")
        if target is not None:
            check_positive_int(target, "target", allow_zero=True)
        self.output_key = check_output_key(output_key)
        self._checked_stages: set = set()
        self.net = net
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.loss_terms = nn.ModuleList(list(losses))
        for term in self.loss_terms:
            if not getattr(term, "name", None):
                raise TypeError(f"each loss term needs a 'name' attribute, got {type(term).__name__}")
        self.target = target
        self.noise_sigmas = tuple(float(s) for s in noise_sigmas)
        self.noise_seed = check_seed(noise_seed, "noise_seed")
        if noise_seed != 0 and not self.noise_sigmas:
            warnings.warn(f"BackdoorClassifier: noise_seed={noise_seed} is ignored without noise_sigmas; pass "
                          "noise_sigmas=[0.05, ...] to log asr@noise", UserWarning, stacklevel=2)
        if init_weights is not None:
            if not isinstance(init_weights, (str, os.PathLike)):
                raise TypeError(f"init_weights must be a checkpoint path (str) or None, got {init_weights!r}")
            init_weights = os.fspath(init_weights)
            if not init_weights:
                raise ValueError("init_weights must be a checkpoint path or None, got an empty string")
        self.init_weights = init_weights
        self._init_weights_done = False
        self.metrics = nn.ModuleDict()
        for stage in ("val", "test"):
            self.metrics[f"{stage}_ba"] = BenignAccuracy()
            self.metrics[f"{stage}_asr"] = AttackSuccessRate()
            for i, _ in enumerate(self.noise_sigmas):
                self.metrics[f"{stage}_asr_noise{i}"] = AttackSuccessRate()
        self.save_hyperparameters(ignore=["net", "losses", "optimizer", "scheduler", "target", "batch_attack"])
        if batch_attack is not None:
            self._adopt_batch_attack(batch_attack)

    def forward(self, x: Tensor) -> Tensor:
        return select_output(self.net(x), self.output_key)

    @property
    def logits_net(self) -> nn.Module:
        """``net``, or ``LogitsOf(net, output_key)`` when ``output_key`` is set: what loss terms and detectors see.

        Built once and not registered as a submodule (no duplicate parameters in the state dict)."""
        if self.output_key is None:
            return self.net
        wrapped = self.__dict__.get("_logits_net")
        if wrapped is None or wrapped.model is not self.net:
            wrapped = LogitsOf(self.net, self.output_key)
            self.__dict__["_logits_net"] = wrapped
        return wrapped

    def _logits(self, x: Tensor, stage: str) -> Tensor:
        """``net(x)`` as checked logits; the first batch of each stage is also checked for pixel space and dtype."""
        if stage not in self._checked_stages:
            self._check_first_batch(x, stage)
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        num_classes = getattr(dm, "num_classes", None) or None
        out = check_logits(self(x), "the net (BackdoorClassifier)", num_classes=num_classes)
        self._checked_stages.add(stage)
        return out

    def _check_first_batch(self, x: Tensor, stage: str) -> None:
        check_images(x.detach(), f"the first {stage} batch", allow_single=False)
        dtype = model_dtype(self.net)
        if x.dtype != dtype:
            raise TypeError(
                f"the {stage} batch is {x.dtype} but the net's parameters are {dtype}: use the same dtype for both "
                f"(e.g. Trainer(precision='64-true') for float64 nets, or net.float())")

    # -- set-up ----------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        self._connect_batch_attack(dm)
        if self.target is None and dm is not None and getattr(dm, "attack", None) is not None:
            self.target = int(dm.target)
        num_classes = getattr(dm, "num_classes", None)
        net_classes = getattr(self.net, "num_classes", None)
        if num_classes and net_classes and int(num_classes) != int(net_classes):
            raise ValueError(
                f"mismatched num_classes: the net outputs {net_classes} classes but the dataset "
                f"{getattr(dm.spec, 'name', '')!r} has {num_classes}; set the model's num_classes={num_classes}"
            )
        in_ch = getattr(self.net, "in_channels", None)
        spec = getattr(dm, "spec", None)
        if in_ch and spec is not None and int(in_ch) != int(spec.channels):
            raise ValueError(
                f"mismatched channels: the net expects in_channels={in_ch} but dataset {spec.name!r} "
                f"has {spec.channels}-channel images; set the model's in_channels={spec.channels}"
            )
        self._load_init_weights()

    # -- the batch-level attack seam ---------------------------------------------------------------
    def _adopt_batch_attack(self, attack: BatchAttack) -> None:
        """Make ``attack`` a submodule (saved in checkpoints, moved with the module) and switch to manual
        optimisation (the classifier's and the attack's optimisers step in :meth:`training_step`)."""
        self.batch_attack = attack
        self.automatic_optimization = False

    def _connect_batch_attack(self, dm: Any) -> None:
        """Adopt the data module's batch attack, or hand ours to the data module (its poisoned eval sets)."""
        dm_attack = getattr(dm, "attack", None) if dm is not None else None
        if self.batch_attack is None:
            if isinstance(dm_attack, BatchAttack):
                self._adopt_batch_attack(dm_attack)
            return
        if dm is None or dm_attack is self.batch_attack:
            return
        if dm_attack is not None and not isinstance(dm_attack, BatchAttack):
            raise ValueError(
                f"the data module poisons its training set with the dataset-level attack "
                f"{getattr(dm_attack, 'name', type(dm_attack).__name__)!r} and this BackdoorClassifier has the batch "
                f"attack {self.batch_attack.name!r}: use one of them (a batch attack goes to "
                "BackdoorDataModule(attack=...) or BackdoorClassifier(batch_attack=...) with a clean data module)")
        if hasattr(dm, "set_batch_attack"):
            dm.set_batch_attack(self.batch_attack)

    def _batch_attack_record(self) -> Dict[str, Any]:
        import inspect

        attack = self.batch_attack
        params = inspect.signature(type(attack).__init__).parameters
        kwargs = {k: v for k, v in attack.hparams().items() if k in params}
        return {"name": attack.name, "kwargs": kwargs}

    def on_save_checkpoint(self, checkpoint: Dict[str, Any]) -> None:
        if self.batch_attack is not None:
            checkpoint["batch_attack"] = self._batch_attack_record()

    def _load_init_weights(self) -> None:
        """Copy ``init_weights`` into ``net`` once (skipped when resuming with ``--ckpt_path``)."""
        if self.init_weights is None or self._init_weights_done:
            return
        if self._trainer is not None and self.trainer.ckpt_path is not None:
            self._init_weights_done = True
            rank_zero_info(f"init_weights={self.init_weights!r} not loaded: restoring the full training state "
                           f"from ckpt_path={self.trainer.ckpt_path!r} instead")
            return
        load_net_weights(self.net, self.init_weights)
        self._init_weights_done = True
        rank_zero_info(f"loaded the network weights of {self.init_weights!r} (fine-tuning: fresh optimiser and "
                       "scheduler, epoch 0)")

    def on_load_checkpoint(self, checkpoint: Dict[str, Any]) -> None:
        # the checkpoint's weights supersede init_weights (load_from_checkpoint, --ckpt_path)
        self._init_weights_done = True
        record = checkpoint.get("batch_attack")
        if self.batch_attack is None and isinstance(record, dict):
            # load_from_checkpoint without batch_attack=: rebuild it so the state dict's generators load
            from ..attacks.batch_base import create_batch_attack

            self._adopt_batch_attack(create_batch_attack(record["name"], **dict(record.get("kwargs") or {})))

    def on_fit_start(self) -> None:
        self._log_backdoor_info()
        self._log_sanitizer_metrics()
        self._log_attack_grid()
        dm = getattr(self.trainer, "datamodule", None)
        for term in self.loss_terms:
            if getattr(term, "requires_fit", False) and not getattr(term, "fitted", False):
                if dm is None or not hasattr(dm, "defense_dataloader"):
                    raise RuntimeError(f"loss term {term.name!r} needs benign data to fit; use a BackdoorDataModule "
                                       "or call term.fit(model, benign) before training")
                term.fit(self.logits_net, dm.defense_dataloader())
                k = getattr(term, "k", None)
                if k is not None:
                    for logger in self.loggers:
                        logger.log_hyperparams({f"loss/{term.name}/k": int(k)})

    def on_test_start(self) -> None:
        self._log_backdoor_info()

    def _log_backdoor_info(self) -> None:
        dm = getattr(self.trainer, "datamodule", None)
        if dm is None or not hasattr(dm, "backdoor_info"):
            return
        info = {"backdoor": dm.backdoor_info()}
        for logger in self.loggers:
            logger.log_hyperparams(info)

    def _log_attack_grid(self, num_images: int = 8) -> None:
        """``attack/trigger_grid`` to W&B loggers, once per run (a fresh fit; a resumed one has logged it)."""
        from lightning.pytorch.loggers import WandbLogger

        loggers = [lg for lg in self.loggers if isinstance(lg, WandbLogger)]
        dm = getattr(self.trainer, "datamodule", None)
        attack = getattr(dm, "attack", None)
        resumed = getattr(self.trainer, "ckpt_path", None) is not None or self.trainer.global_step > 0
        if not loggers or attack is None or resumed or self.trainer.global_rank != 0:
            return
        try:
            from ..attacks.preview import trigger_grid, trigger_rows
            from ..utils import random_subset

            clean = dm.test_clean
            picks = random_subset(len(clean), min(num_images, len(clean)), seed=int(getattr(dm, "seed", 0)))
            x = torch.stack([clean[int(i)][0] for i in picks])
            rows = trigger_rows(attack, x, seed=int(getattr(dm, "seed", 0)))
            caption = f"{getattr(attack, 'name', type(attack).__name__)}: rows " + " / ".join(rows)
            for lg in loggers:
                lg.log_image(key="attack/trigger_grid", images=[trigger_grid(rows)], caption=[caption],
                             step=self.trainer.global_step)
        except Exception as e:  # a picture must never break training
            warnings.warn(f"BackdoorClassifier: could not log attack/trigger_grid: {e!r}", UserWarning, stacklevel=2)

    def _log_sanitizer_metrics(self) -> None:
        """``train/sanitiser/*`` of a sanitised training set (docs/sanitizers.md), once per fit."""
        dm = getattr(self.trainer, "datamodule", None)
        metrics = dm.sanitizer_metrics() if hasattr(dm, "sanitizer_metrics") else {}
        for logger in self.loggers if metrics else ():
            logger.log_metrics(metrics, step=self.global_step)

    def configure_optimizers(self) -> Any:
        if self.batch_attack is not None:
            return self._configure_with_batch_attack()
        optimizer = self.optimizer_factory(self.parameters())
        if self.scheduler_factory is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": self.scheduler_factory(optimizer), "interval": "epoch"}}

    def _configure_with_batch_attack(self) -> Any:
        """``[classifier optimiser, attack optimisers...]`` and every scheduler (stepped per epoch by us)."""
        params = [p for n, p in self.named_parameters() if not n.startswith("batch_attack.")]
        optimizers = [self.optimizer_factory(params)]
        schedulers = []
        if self.scheduler_factory is not None:
            schedulers.append({"scheduler": self.scheduler_factory(optimizers[0]), "interval": "epoch"})
        self._attack_phases = []
        for entry in self.batch_attack.configure_optimizers():
            if entry.phase not in ("train", "pretrain"):
                raise ValueError(f"batch attack {self.batch_attack.name!r}: optimiser {entry.name!r} has phase "
                                 f"{entry.phase!r}; expected 'train' or 'pretrain'")
            optimizers.append(entry.optimizer)
            self._attack_phases.append(entry.phase)
            if entry.scheduler is not None:
                schedulers.append({"scheduler": entry.scheduler, "interval": "epoch"})
        return optimizers, schedulers

    def on_train_epoch_start(self) -> None:
        self._stepped_optimizers = set()

    def on_train_epoch_end(self) -> None:
        if self.automatic_optimization:
            return
        schedulers = self.lr_schedulers()
        if schedulers is None:
            return
        stepped = getattr(self, "_stepped_optimizers", set())
        for sched in schedulers if isinstance(schedulers, list) else [schedulers]:
            # a schedule advances with the epochs its optimiser trained in (not during the attack's pre-training)
            if id(getattr(sched, "optimizer", None)) in stepped:
                sched.step()

    # -- training --------------------------------------------------------------------------------
    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        if self.batch_attack is not None:
            return self._batch_attack_step(batch)
        b = parse_batch(batch, require_labels=True)
        x, y = b.x, b.y
        poisoned = b.poisoned if b.poisoned is not None else torch.zeros_like(y, dtype=torch.bool)
        original_y = b.original_y
        logits = self._logits(x, "train")
        loss_bd = F.cross_entropy(logits, y)
        main_weight = 1.0
        extra = torch.zeros((), device=loss_bd.device)
        for term in self.loss_terms:
            main_weight *= float(getattr(term, "main_weight", 1.0))
            value = term(self.logits_net, x, y, poisoned, original_y, self.target, logits=logits)
            if value is None:
                continue
            extra = extra + value
            self.log(f"train/loss/{term.name}", value.detach(), on_step=True, on_epoch=True, batch_size=len(x))
        loss = main_weight * loss_bd + extra
        if not bool(torch.isfinite(loss.detach())):
            raise FloatingPointError(
                f"training diverged: the loss is {float(loss.detach())} at global step {self.global_step} (L_bd "
                f"{float(loss_bd.detach())}); the weights would turn NaN from here. Lower the learning rate or clip "
                "gradients (Trainer(gradient_clip_val=5.0), as configs/adaptive/*.yaml do)")
        n = len(x)
        self.log("train/loss", loss.detach(), on_step=True, on_epoch=True, prog_bar=True, batch_size=n)
        if len(self.loss_terms):
            self.log("train/loss/bd", loss_bd.detach(), on_step=True, on_epoch=True, batch_size=n)
            for term in self.loss_terms:
                if hasattr(term, "skipped"):
                    self.log(f"train/loss/{term.name}_skipped", float(term.skipped), on_step=False, on_epoch=True,
                             reduce_fx="max", batch_size=n)
        return loss

    def _batch_attack_step(self, batch: Any) -> Tensor:
        """One manual-optimisation step with the batch attack: pre-training, or poison + train both."""
        b = parse_batch(batch, require_labels=True)
        x, y = b.x, b.y
        if "train" not in self._checked_stages:
            self._check_first_batch(x, "train")
        if self.target is None:
            raise RuntimeError(f"the batch attack {self.batch_attack.name!r} needs a target label: pass "
                               "BackdoorClassifier(target=...) or use a BackdoorDataModule (its target)")
        opts = self.optimizers()
        opts = list(opts) if isinstance(opts, (list, tuple)) else [opts]
        attack_opts = list(zip(opts[1:], self._attack_phases))
        phase = self.batch_attack.phase()
        n = len(x)
        if phase == "pretrain":
            stepping = [o for o, ph in attack_opts if ph == "pretrain"]
            if not stepping:
                raise RuntimeError(f"batch attack {self.batch_attack.name!r} is in its pre-training phase but has no "
                                   "optimiser with phase='pretrain'")
            loss = self.batch_attack.pretrain_loss(x, y)
            self._check_finite(loss, loss)
            self._step(stepping, loss)
            self.batch_attack.step_done(phase)
            self.log("train/loss/pretrain", loss.detach(), on_step=True, on_epoch=True, batch_size=n)
            return loss.detach()
        pb = self.batch_attack.poison_batch(x, y, int(self.target))
        if not isinstance(pb.x, Tensor) or pb.x.shape != x.shape or pb.y.shape != y.shape:
            raise ValueError(f"batch attack {self.batch_attack.name!r}: poison_batch must return x and y shaped like "
                             f"the batch ({tuple(x.shape)}, {tuple(y.shape)}), got "
                             f"{tuple(getattr(pb.x, 'shape', ()))}, {tuple(getattr(pb.y, 'shape', ()))}")
        logits = self._logits(pb.x, "train")
        loss_bd = F.cross_entropy(logits, pb.y)
        main_weight = 1.0
        extra = torch.zeros((), device=loss_bd.device)
        for term in self.loss_terms:
            main_weight *= float(getattr(term, "main_weight", 1.0))
            value = term(self.logits_net, pb.x, pb.y, pb.poisoned, y, self.target, logits=logits)
            if value is not None:
                extra = extra + value
                self.log(f"train/loss/{term.name}", value.detach(), on_step=True, on_epoch=True, batch_size=n)
        attack_loss = self.batch_attack.attack_loss(x, y, pb)
        loss = main_weight * loss_bd + extra + (attack_loss if attack_loss is not None else 0.0)
        self._check_finite(loss, loss_bd)
        self._step([opts[0]] + [o for o, ph in attack_opts if ph == "train"], loss)
        self.batch_attack.step_done(phase)
        self.log("train/loss", loss.detach(), on_step=True, on_epoch=True, prog_bar=True, batch_size=n)
        self.log("train/loss/bd", loss_bd.detach(), on_step=True, on_epoch=True, batch_size=n)
        if attack_loss is not None:
            self.log("train/loss/attack", attack_loss.detach(), on_step=True, on_epoch=True, batch_size=n)
        return loss.detach()

    def _step(self, optimizers: Sequence[Any], loss: Tensor) -> None:
        for opt in optimizers:
            opt.zero_grad()
        self.manual_backward(loss)
        stepped = self.__dict__.setdefault("_stepped_optimizers", set())
        for opt in optimizers:
            opt.step()
            stepped.add(id(getattr(opt, "optimizer", opt)))

    def _check_finite(self, loss: Tensor, loss_bd: Tensor) -> None:
        if not bool(torch.isfinite(loss.detach())):
            raise FloatingPointError(
                f"training diverged: the loss is {float(loss.detach())} at global step {self.global_step} (L_bd "
                f"{float(loss_bd.detach())}); the weights would turn NaN from here. Lower the learning rate(s)")

    # -- evaluation ------------------------------------------------------------------------------
    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step("val", batch, batch_idx, dataloader_idx)

    def test_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step("test", batch, batch_idx, dataloader_idx)

    def _eval_step(self, stage: str, batch: Any, batch_idx: int, dataloader_idx: int) -> None:
        b = parse_batch(batch, require_labels=True)
        x, y, original_y = b.x, b.y, b.original_y
        if dataloader_idx == 1 and self.batch_attack is not None:
            # the poisoned set of a batch attack holds clean images: the current trigger, on the device
            x = self.batch_attack.trigger(x)
        logits = self._logits(x, stage)
        n = len(x)
        if dataloader_idx == 0:
            metric = self.metrics[f"{stage}_ba"]
            metric.update(logits, y)
            self.log(f"{stage}/ba", metric, on_step=False, on_epoch=True, prog_bar=True,
                     add_dataloader_idx=False, batch_size=n)
            return
        if self.target is None:
            raise RuntimeError("a poisoned evaluation loader needs target=<label> (or a BackdoorDataModule with an attack)")
        metric = self.metrics[f"{stage}_asr"]
        metric.update(logits, original_y, self.target)
        self.log(f"{stage}/asr", metric, on_step=False, on_epoch=True, prog_bar=True, add_dataloader_idx=False, batch_size=n)
        if self.noise_sigmas:
            # seeded per sample (by its dataset index when the batch carries one), so the numbers do not
            # depend on batch composition or the DDP rank a sample lands in
            ids = b.index if b.index is not None else batch_idx * len(x) + torch.arange(len(x))
            noise = per_sample_normal(x, ids.cpu(), self.noise_seed)
            for i, sigma in enumerate(self.noise_sigmas):
                noisy = (x + sigma * noise).clamp_(0, 1)
                m = self.metrics[f"{stage}_asr_noise{i}"]
                m.update(self(noisy), original_y, self.target)
                self.log(f"{stage}/{noise_key(sigma)}", m, on_step=False, on_epoch=True,
                         add_dataloader_idx=False, batch_size=n)
