"""The ``lightning-backdoor`` console script: LightningCLI with ``fit`` / ``validate`` / ``test``.

    lightning-backdoor fit --config configs/quickstart.yaml
    lightning-backdoor test --config configs/detect.yaml --ckpt_path path/to/model.ckpt

Any LightningModule / LightningDataModule can be named with ``class_path``; ours are
:class:`~lightning_backdoor.modules.BackdoorClassifier` and
:class:`~lightning_backdoor.data.BackdoorDataModule`. Extra top-level option: ``--test_after_fit``
(run ``test`` on the trained weights right after ``fit``, as the quickstart does).

Checkpoints (``--ckpt_path path/to.ckpt`` or ``--ckpt_path last`` to resume a fit) are loaded with
``weights_only=True`` unless ``--weights_only false`` is given: a file carrying arbitrary pickled
objects is refused before anything is unpickled (:class:`~lightning_backdoor.checkpoints.UnsafeCheckpointError`),
and a checkpoint of another architecture or class count is refused with the differing keys and
shapes listed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, List, Optional

from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn

from .checkpoints import safe_load, state_dict_mismatches


def check_checkpoint_matches(model: LightningModule, path: str) -> None:
    """Raise ``ValueError`` listing missing/unexpected keys and shape differences when the checkpoint at
    ``path`` (read with ``weights_only=True``) was written by another architecture or class count."""
    ckpt = safe_load(path)
    state = ckpt.get("state_dict") if isinstance(ckpt, dict) else None
    if not isinstance(state, dict):
        return  # not a Lightning checkpoint; Lightning reports it
    missing, unexpected, shapes = state_dict_mismatches(model, state)
    if not (missing or unexpected or shapes):
        return
    lines = [f"checkpoint '{path}' does not match the model {type(model).__name__} of this config:"]
    for title, items in (("missing keys (in the model, not in the checkpoint)", missing),
                         ("unexpected keys (in the checkpoint, not in the model)", unexpected),
                         ("shape mismatches", shapes)):
        if items:
            lines.append(f"  {title}: {', '.join(items[:20])}" + (f", ... and {len(items) - 20} more" if len(items) > 20 else ""))
    lines.append("  use the network settings (class, num_classes, in_channels, width, depth) the checkpoint was trained with")
    raise ValueError("\n".join(lines))


class BackdoorCLI(LightningCLI):
    """LightningCLI with ``--test_after_fit``, safe checkpoint loading and a pointer to the W&B run folder."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument("--test_after_fit", type=bool, default=False,
                            help="after fit, run test on the final weights (fit subcommand only)")

    # -- checkpoints -----------------------------------------------------------------------------
    def _ckpt_file(self, config: Any) -> Optional[str]:
        ckpt = config.get("ckpt_path") if config is not None else None
        return str(ckpt) if ckpt and Path(str(ckpt)).is_file() else None

    def _parse_ckpt_path(self) -> None:
        # Lightning reads the checkpoint's hyperparameters here; refuse an unsafe file first, with a clear error
        sub = self.config.get("subcommand")
        if sub:
            path = self._ckpt_file(self.config[sub])
            if path is not None and self.config[sub].get("weights_only") is not False:
                safe_load(path)
        super()._parse_ckpt_path()

    def _prepare_subcommand_kwargs(self, subcommand: str) -> dict:
        kwargs = super()._prepare_subcommand_kwargs(subcommand)
        if "weights_only" in self._subcommand_method_arguments.get(subcommand, ()) and kwargs.get("weights_only") is None:
            kwargs["weights_only"] = True
        path = self._ckpt_file(kwargs)
        if path is not None and kwargs.get("weights_only") is not False:
            check_checkpoint_matches(self.model, path)
        return kwargs

    def after_fit(self) -> None:
        if self.config.get(self.subcommand, {}).get("test_after_fit", False):
            self.trainer.test(self.model, datamodule=self.datamodule)
        self._report_wandb()

    def after_validate(self) -> None:
        self._report_wandb()

    def after_test(self) -> None:
        self._report_wandb()

    @rank_zero_only
    def _report_wandb(self) -> None:
        try:
            self._print_wandb_folders()
        except Exception as e:  # reporting must never fail a finished run
            rank_zero_warn(f"could not report the W&B run folder: {e!r}")

    def _print_wandb_folders(self) -> None:
        for logger in self.trainer.loggers:
            if not isinstance(logger, WandbLogger):
                continue
            run = logger.experiment
            run_dir = Path(getattr(run, "dir", "") or "").parent
            if not str(run_dir) or str(run_dir) == ".":
                continue
            offline = getattr(getattr(run, "settings", None), "mode", "") == "offline" or "offline-run" in run_dir.name
            print(f"\nW&B run folder: {run_dir}")
            if offline:
                print(f"  offline run; upload it later with:  wandb sync {run_dir}")


def main(args: Optional[List[str]] = None) -> None:
    """Entry point of the ``lightning-backdoor`` console script."""
    BackdoorCLI(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        args=args,
        auto_configure_optimizers=False,
    )


if __name__ == "__main__":  # pragma: no cover
    main()
