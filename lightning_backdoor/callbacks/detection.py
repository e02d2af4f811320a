"""``DetectionCallback``: run input-level backdoor detectors at validate/test time and log how well they work."""

from __future__ import annotations

import time
import warnings
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from torch.utils.data import DataLoader

from ..detectors.base import Detector, collect_benign
from ..metrics.detection import DetectionMetrics
from ..models.outputs import LogitsOf, check_logits, check_output_key
from ..utils import evaluating, model_device
from ..validation import check_bool, check_optional_positive_int, check_positive_int, check_probability, check_seed
from ._evaluation import EvaluationEndHooks, device_trigger, iter_batches, log_once, per_sample_noise, rank_and_world, sample_ids, shard

_STAGES = ("validate", "test")
_PREFIX = {"validate": "val", "test": "test"}


def resolve_net(pl_module: nn.Module, attr: Optional[str], output_key: Union[str, int, None] = None) -> nn.Module:
    """The classifier detectors should see: ``pl_module.<attr>`` (default ``net`` if present) or the module,
    wrapped in :class:`~lightning_backdoor.models.LogitsOf` when ``output_key`` selects the logits from its output."""
    if attr is not None:
        net = getattr(pl_module, attr, None)
        if not isinstance(net, nn.Module):
            found = sorted(n for n, m in pl_module.named_children())
            raise AttributeError(f"model_attr={attr!r}: the LightningModule has no nn.Module attribute {attr!r}; "
                                 f"its submodules are {found}")
    else:
        logits_net = getattr(pl_module, "logits_net", None)  # BackdoorClassifier(output_key=...) adapts its net
        if isinstance(logits_net, nn.Module) and output_key is None:
            return logits_net
        net = getattr(pl_module, "net", None)
        net = net if isinstance(net, nn.Module) else pl_module
    return LogitsOf(net, output_key) if output_key is not None else net


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class DetectionCallback(EvaluationEndHooks, Callback):
    """Scores benign and poisoned evaluation samples with each detector and logs detection metrics.

    Works in any Lightning training whose module's forward (or ``module.net``) returns logits. Samples
    come from the :class:`~lightning_backdoor.data.BackdoorDataModule` (``eval_dataloaders(stage)`` and
    ``defense_dataloader()``) or from loaders given here. Data-limited detectors are fitted, at each
    run, on a small benign set held apart from the evaluated samples (``fit_loader`` or the data
    module's defence split).

    Logged keys, per ``stage`` in ``val``/``test`` and detector ``det`` (its ``name``):

    - ``{stage}/{det}/auroc``, ``/f1`` (at the detector's threshold), ``/tpr@fpr1``, ``/tpr@fpr5``: all
      evaluated samples (positives: poisoned inputs whose true label is not the target; negatives:
      benign inputs);
    - ``{stage}/{det}/successful/auroc``, ``/f1``, ``/tpr@fpr1``, ``/tpr@fpr5``: only poisoned inputs
      predicted as the target and benign inputs predicted correctly (needs the target label and the
      benign labels: without them these keys are not logged, with a warning);
    - ``{stage}/{det}/relative_cost``: detector time per image / plain forward time per image;
    - ``{stage}/{det}/k`` for detectors with a selected layer count (IBD-PSC);
    - with ``plots=True``, W&B-native charts that W&B can overlay across runs: ``{stage}/{det}/roc_curve``
      (a ``wandb.plot.line`` over a ``wandb.Table`` of ``fpr``/``tpr``), ``{stage}/{det}/scores_benign`` and
      ``/scores_poisoned`` (``wandb.Histogram``), plus the ``{stage}/{det}/roc`` and ``/scores`` images;
      TensorBoard loggers get the two images (``add_image``); other loggers the scalars only;
    - with ``sample_table=N``: ``{stage}/detection_samples``, a per-sample ``wandb.Table`` (W&B only).

    When: at the end of each validation (every ``every_n_epochs`` epochs during ``fit``) and test run,
    once — after the last batch of the last evaluation dataloader, so the values appear once in the
    test table and in what ``trainer.test`` returns (in the poisoned loader's results).

    Batch-level attacks (IAD): their poisoned sets hold clean images (:class:`~lightning_backdoor.data.DeviceTriggerSet`)
    and the module's *current* trigger (``pl_module.batch_attack.trigger``) is applied to each batch on the
    device before scoring, so the detectors see the generator of the epoch they run in.

    Samples: capped sets (``max_samples``, ``fit_samples``) are seeded random samples of the sets
    (``seed``; the same on every rank), never their first samples.

    Metrics are torchmetrics with ``"cat"`` states: under DDP each rank scores its own share of the
    samples (no padding, no repeats) and the metrics equal the single-process ones; detectors are
    fitted on the same held-apart samples on every rank, so their fitted state is identical.
    After a run, ``last_results`` holds the logged values and ``last_num_scored`` the number of
    benign / poisoned samples *this rank* scored (noise copies not counted).

    Args:
        detectors: the detectors to run (e.g. ``[ScaleUp(), IBDPSC(), Strip()]``).
        stages: any of ``"validate"``, ``"test"``.
        every_n_epochs: run at validation every n epochs (test always runs).
        max_samples: cap on benign and on poisoned samples per run (None: all).
        fit_samples: cap on the benign samples used for fitting detectors.
        noise_copies: also score a noise-augmented copy of both sets (as the papers do).
        noise_magnitude: standard deviation of that noise (0.05).
        benign_loader / poisoned_loader / fit_loader: loaders to use instead of the data module's;
            batches are ``(x, y, ...)`` tuples or dicts with ``x``/``y``; ``x`` in ``[0, 1]``.
        target: the target label (default: the data module's ``target``).
        model_attr: attribute of the LightningModule holding the classifier (default: ``net`` if
            present, else the module itself).
        output_key: when the model's forward returns a tuple, dict or output object, what selects
            the logits (``0``, ``"logits"``); see :class:`~lightning_backdoor.models.LogitsOf`.
        plots: log ROC curves and score histograms to W&B loggers.
        progress: show a progress bar while scoring (only when the Trainer shows progress bars).
        seed: seeds the capped subsets and the noise copies.
        name: distinguishes the checkpoint state of two callbacks with the same detectors.
        sample_table: log a per-sample ``wandb.Table`` ``{stage}/detection_samples`` (set, position, true
            label, prediction, noisy copy or not, one score column per detector) of at most this many rows
            (a seeded random sample of the scored inputs); None: no table.
    """

    def __init__(
        self,
        detectors: Sequence[Detector],
        stages: Sequence[str] = _STAGES,
        every_n_epochs: int = 1,
        max_samples: Optional[int] = 1000,
        fit_samples: Optional[int] = 200,
        noise_copies: bool = False,
        noise_magnitude: float = 0.05,
        benign_loader: Optional[DataLoader] = None,
        poisoned_loader: Optional[DataLoader] = None,
        fit_loader: Optional[DataLoader] = None,
        target: Optional[int] = None,
        model_attr: Optional[str] = None,
        output_key: Union[str, int, None] = None,
        plots: bool = True,
        progress: bool = True,
        seed: int = 0,
        name: Optional[str] = None,
        sample_table: Optional[int] = None,
    ) -> None:
        detectors = list(detectors)
        if not detectors:
            raise ValueError("detectors must be a non-empty list of Detector instances, e.g. [ScaleUp(), Strip()]")
        for d in detectors:
            if not isinstance(d, Detector):
                raise TypeError(f"detectors must be Detector instances, got {type(d).__name__}")
        names = [d.name for d in detectors]
        if len(set(names)) != len(names):
            raise ValueError(f"detector names must be unique (they name the metrics), got {names}")
        if isinstance(stages, str):
            stages = (stages,)
        for s in stages:
            if s not in _STAGES:
                raise ValueError(f"stages must be a subset of {list(_STAGES)}, got {list(stages)}")
        every_n_epochs = check_positive_int(every_n_epochs, "every_n_epochs")
        max_samples = check_optional_positive_int(max_samples, "max_samples")
        fit_samples = check_optional_positive_int(fit_samples, "fit_samples")
        noise_magnitude = check_probability(noise_magnitude, "noise_magnitude", low_open=True)
        if every_n_epochs != 1 and "validate" not in stages:
            warnings.warn(f"DetectionCallback: every_n_epochs={every_n_epochs} is ignored without 'validate' in "
                          f"stages={list(stages)} (test always runs once)", UserWarning, stacklevel=2)
        if not noise_copies and noise_magnitude != 0.05:
            warnings.warn(f"DetectionCallback: noise_magnitude={noise_magnitude} is ignored with noise_copies=False; "
                          "pass noise_copies=True to score noise-augmented copies", UserWarning, stacklevel=2)
        if target is not None:
            check_positive_int(target, "target", allow_zero=True)
        if name is not None and not isinstance(name, str):
            raise TypeError(f"name must be a str or None, got {name!r}")
        self.detectors = detectors
        self.stages = tuple(stages)
        self.every_n_epochs = every_n_epochs
        self.max_samples, self.fit_samples = max_samples, fit_samples
        self.noise_copies, self.noise_magnitude = check_bool(noise_copies, "noise_copies"), float(noise_magnitude)
        self.benign_loader, self.poisoned_loader, self.fit_loader = benign_loader, poisoned_loader, fit_loader
        self.target, self.model_attr, self.output_key = target, model_attr, check_output_key(output_key)
        self.plots, self.progress, self.seed = check_bool(plots, "plots"), check_bool(progress, "progress"), check_seed(seed)
        self.name = name
        self.sample_table = check_optional_positive_int(sample_table, "sample_table")
        self.last_results: Dict[str, float] = {}
        self.last_num_scored: Dict[str, int] = {}

    @property
    def state_key(self) -> str:
        # detector names (and an optional name), not the stages: a test run with other stages than the fit
        # that wrote the checkpoint still finds its state
        return self._generate_state_key(detectors=[d.name for d in self.detectors], name=self.name)

    # -- hooks (EvaluationEndHooks runs _run once per evaluation epoch) ----------------------------
    def _should_run(self, trainer: Trainer, stage: str) -> bool:
        if stage not in self.stages:
            return False
        if stage == "validate" and trainer.state.fn == "fit":
            return (trainer.current_epoch + 1) % self.every_n_epochs == 0
        return True

    def state_dict(self) -> Dict[str, Any]:
        return {"detectors": {d.name: d.state_dict() for d in self.detectors}}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        for d in self.detectors:
            if d.name in state_dict.get("detectors", {}):
                d.load_state_dict(state_dict["detectors"][d.name])

    # -- work ------------------------------------------------------------------------------------
    def _loaders(self, trainer: Trainer, stage: str) -> Tuple[Optional[DataLoader], Optional[DataLoader], Optional[DataLoader]]:
        benign, poisoned, fit = self.benign_loader, self.poisoned_loader, self.fit_loader
        dm = getattr(trainer, "datamodule", None)
        if dm is not None and hasattr(dm, "eval_dataloaders"):
            dm_benign, dm_poisoned = dm.eval_dataloaders(stage)
            benign = benign if benign is not None else dm_benign
            poisoned = poisoned if poisoned is not None else dm_poisoned
            if fit is None and getattr(dm, "defense_size", 0):
                fit = dm.defense_dataloader()
        return benign, poisoned, fit

    def _target(self, trainer: Trainer) -> Optional[int]:
        if self.target is not None:
            return int(self.target)
        dm = getattr(trainer, "datamodule", None)
        return int(dm.target) if dm is not None and getattr(dm, "attack", None) is not None else None

    def _run(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        prefix = _PREFIX[stage]
        benign, poisoned, fit = self._loaders(trainer, stage)
        if benign is None or poisoned is None:
            rank_zero_warn(f"DetectionCallback: no {'benign' if benign is None else 'poisoned'} loader for "
                           f"stage {stage!r}; skipping detection (pass benign_loader/poisoned_loader or use a "
                           "BackdoorDataModule with an attack)")
            return
        for what, loader in (("benign", benign), ("poisoned", poisoned)):
            if hasattr(loader, "dataset") and hasattr(loader.dataset, "__len__") and len(loader.dataset) == 0:
                rank_zero_warn(f"DetectionCallback: the {what} loader of stage {stage!r} is empty; skipping detection "
                               f"(pass a non-empty {what}_loader)")
                return
        target = self._target(trainer)
        if target is None:
            rank_zero_warn("DetectionCallback: no target label (target=None and no BackdoorDataModule with an attack): "
                           "the 'successful only' metrics need it to know which poisoned inputs reached the target, so "
                           f"{prefix}/<det>/successful/* are not logged; pass target=<label>")
        net = resolve_net(pl_module, self.model_attr, self.output_key)
        device = pl_module.device
        active = self._fit_detectors(net, fit, prefix)
        if not active:
            return
        rank, world = rank_and_world(trainer)
        show = self.progress and rank == 0 and getattr(trainer, "progress_bar_callback", None) is not None
        trigger = device_trigger(poisoned, pl_module, trainer)  # batch attacks: the current generator, on the device
        results = self._score_sets(net, active, benign, poisoned, target, device, rank, world, prefix, show,
                                   trigger=trigger)
        values: Dict[str, float] = {}
        for det in active:
            for subset, metric in results["metrics"][det.name].items():
                n_pos, n_neg = self._counts(metric)
                if n_pos == 0 or n_neg == 0:
                    rank_zero_warn(f"DetectionCallback: {prefix}/{det.name}{subset}: {n_pos} poisoned and {n_neg} "
                                   "benign samples; AUROC needs both, skipping these metrics")
                    metric.reset()
                    continue
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # one-class/equal-score warnings are handled above
                    out = metric.compute()
                for key, val in out.items():
                    values[f"{prefix}/{det.name}{subset}/{key}"] = float(val)
                if subset == "" and self.plots:
                    self._plot(trainer, prefix, det, metric)
                metric.reset()
            cost = results["cost"][det.name]
            values[f"{prefix}/{det.name}/relative_cost"] = cost
            k = getattr(det, "k", None)
            if isinstance(k, int):
                values[f"{prefix}/{det.name}/k"] = float(k)
        if results["rows"] is not None:
            self._sample_table(trainer, prefix, results["rows"])
        log_once(pl_module, values)
        self.last_results = values

    def _fit_detectors(self, net: nn.Module, fit: Optional[DataLoader], prefix: str) -> List[Detector]:
        active = []
        benign = None
        if fit is not None and any(d.requires_fit for d in self.detectors):
            # the same held-apart samples on every rank, so fitted state is identical across ranks
            benign = collect_benign(fit, device=model_device(net), max_samples=self.fit_samples, seed=self.seed)
        for det in self.detectors:
            if det.requires_fit:
                if fit is None:
                    rank_zero_warn(f"DetectionCallback: {det.name} needs benign data to fit and no fit_loader/"
                                   "defense set is available; skipping it")
                    continue
                try:
                    det.fit(net, benign)
                except ValueError as e:  # e.g. IBD-PSC: no k reaches xi on this model
                    rank_zero_warn(f"DetectionCallback: {prefix}/{det.name} could not be fitted: {e}")
                    continue
            active.append(det)
        return active

    def _score_sets(self, net, active, benign, poisoned, target, device, rank, world, prefix, show,
                    trigger=None) -> Dict[str, Any]:
        subsets = [""] if target is None else ["", "/successful"]
        metrics = {d.name: {sub: DetectionMetrics(d.threshold).to(device) for sub in subsets} for d in active}
        det_time = {d.name: 0.0 for d in active}
        fwd_time, fwd_images = 0.0, 0
        sets = [(benign, False, 0), (poisoned, True, 1)]
        self.last_num_scored = {}
        copies = [False, True] if self.noise_copies else [False]
        rows: Dict[str, List[Tensor]] = {"set": [], "position": [], "noisy": [], "label": [], "pred": []}
        rows.update({f"score/{d.name}": [] for d in active})
        keep_rows = self.sample_table is not None
        try:
            from tqdm.auto import tqdm
        except ImportError:  # pragma: no cover
            tqdm = None
        for loader, is_poisoned, set_id in sets:
            sub, positions = shard(loader, rank, world, self.max_samples, seed=self.seed)
            self.last_num_scored["poisoned" if is_poisoned else "benign"] = int(len(positions))
            it = iter_batches(sub, positions, device, transform=trigger if is_poisoned else None)
            if tqdm is not None and show:
                it = tqdm(it, total=len(sub), desc=f"{prefix} detection ({'poisoned' if is_poisoned else 'benign'})",
                          leave=False, dynamic_ncols=True)
            for x, y, pos in it:
                for noisy in copies:
                    xb = per_sample_noise(x, pos, self.noise_magnitude, self.seed * 2 + set_id) if noisy else x
                    _sync(device)
                    t0 = time.perf_counter()
                    with evaluating(net):
                        preds = check_logits(net(xb), "the model (DetectionCallback)").argmax(dim=-1)
                    _sync(device)
                    fwd_time += time.perf_counter() - t0
                    fwd_images += len(xb)
                    label = torch.full((len(xb),), int(is_poisoned), dtype=torch.long, device=device)
                    ok = None
                    if target is not None:
                        if is_poisoned:
                            ok = preds == target
                        elif y is not None:
                            ok = preds == y
                        else:
                            raise ValueError("DetectionCallback: the benign loader's batches carry no labels, which the "
                                             "'successful only' metrics need (benign inputs predicted correctly); "
                                             "use (x, y) batches")
                    if keep_rows:
                        rows["set"].append(torch.full((len(xb),), set_id, dtype=torch.long, device=device))
                        rows["position"].append(pos.to(device).long())
                        rows["noisy"].append(torch.full((len(xb),), int(noisy), dtype=torch.long, device=device))
                        rows["label"].append(y.long() if y is not None else torch.full_like(preds, -1))
                        rows["pred"].append(preds.long())
                    for det in active:
                        t0 = time.perf_counter()
                        if det.accepts_sample_ids:
                            scores = det.score(net, xb, sample_ids=sample_ids(set_id, pos)).to(device)
                        else:
                            scores = det.score(net, xb).to(device)
                        _sync(device)
                        det_time[det.name] += time.perf_counter() - t0
                        metrics[det.name][""].update(scores, label)
                        if keep_rows:
                            rows[f"score/{det.name}"].append(scores.double())
                        if ok is not None and bool(ok.any()):
                            metrics[det.name]["/successful"].update(scores[ok], label[ok])
        per_fwd = fwd_time / max(fwd_images, 1)
        cost = {name: (t / max(fwd_images, 1)) / per_fwd if per_fwd > 0 else float("nan") for name, t in det_time.items()}
        return {"metrics": metrics, "cost": cost, "rows": rows if keep_rows else None}

    @staticmethod
    def _counts(metric: DetectionMetrics) -> Tuple[int, int]:
        """Global numbers of poisoned / benign samples in ``metric`` (summed over ranks)."""
        local = torch.cat(metric.target) if metric.target else torch.zeros(0, dtype=torch.long)
        counts = torch.tensor([int(local.sum()), int((local == 0).sum())], device=metric.device)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(counts)
        return int(counts[0]), int(counts[1])

    def _plot(self, trainer: Trainer, prefix: str, det: Detector, metric: DetectionMetrics) -> None:
        from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger

        wandb_loggers = [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]
        tb_loggers = [lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]
        if not wandb_loggers and not tb_loggers:
            return
        from torchmetrics.utilities.distributed import gather_all_tensors

        scores, labels = torch.cat(metric.scores), torch.cat(metric.target)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            scores = torch.cat(gather_all_tensors(scores))
            labels = torch.cat(gather_all_tensors(labels))
        if trainer.global_rank != 0:
            return
        try:
            from ..plots import roc_and_histogram, roc_points

            scores, labels = scores.cpu(), labels.cpu()
            roc_img, hist_img = roc_and_histogram(scores, labels, title=f"{prefix}/{det.name}", threshold=det.threshold)
            step = trainer.global_step
            for lg in wandb_loggers:
                import wandb

                fpr, tpr = roc_points(scores, labels)
                table = wandb.Table(columns=["fpr", "tpr"], data=[[float(a), float(b)] for a, b in zip(fpr, tpr)])
                lg.experiment.log({
                    f"{prefix}/{det.name}/roc_curve": wandb.plot.line(table, "fpr", "tpr", title=f"ROC {prefix}/{det.name}"),
                    f"{prefix}/{det.name}/scores_benign": wandb.Histogram(scores[labels == 0].numpy()),
                    f"{prefix}/{det.name}/scores_poisoned": wandb.Histogram(scores[labels == 1].numpy()),
                    "trainer/global_step": step,
                })
                lg.log_image(key=f"{prefix}/{det.name}/roc", images=[roc_img], step=step)
                lg.log_image(key=f"{prefix}/{det.name}/scores", images=[hist_img], step=step)
            for lg in tb_loggers:
                lg.experiment.add_image(f"{prefix}/{det.name}/roc", roc_img, step, dataformats="HWC")
                lg.experiment.add_image(f"{prefix}/{det.name}/scores", hist_img, step, dataformats="HWC")
        except Exception as e:  # plots must never break training
            rank_zero_warn(f"DetectionCallback: could not log plots for {prefix}/{det.name}: {e!r}")

    def _sample_table(self, trainer: Trainer, prefix: str, rows: Dict[str, List[Tensor]]) -> None:
        from lightning.pytorch.loggers import WandbLogger

        if not rows["set"]:
            return
        cols = {k: torch.cat(v) for k, v in rows.items() if v}
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            from torchmetrics.utilities.distributed import gather_all_tensors

            cols = {k: torch.cat(gather_all_tensors(v)) for k, v in cols.items()}
        loggers = [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]
        if trainer.global_rank != 0 or not loggers:
            return
        try:
            import wandb

            from ..utils import random_subset

            n = len(cols["set"])
            keep = random_subset(n, self.sample_table, self.seed)
            names = list(cols)
            data = []
            for i in keep.tolist():
                row = []
                for k in names:
                    v = cols[k][i].item()
                    row.append(("benign", "poisoned")[int(v)] if k == "set" else bool(v) if k == "noisy" else v)
                data.append(row)
            columns = [k.replace("score/", "") + ("_score" if k.startswith("score/") else "") for k in names]
            for lg in loggers:
                lg.experiment.log({f"{prefix}/detection_samples": wandb.Table(columns=columns, data=data),
                                   "trainer/global_step": trainer.global_step})
        except Exception as e:  # tables must never break training
            rank_zero_warn(f"DetectionCallback: could not log the sample table for {prefix}: {e!r}")
