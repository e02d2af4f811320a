"""The ``lightning-backdoor`` console script: LightningCLI with ``fit`` / ``validate`` / ``test``.

    lightning-backdoor fit --config configs/quickstart.yaml
    lightning-backdoor test --config configs/detect.yaml --ckpt_path path/to/model.ckpt

Any LightningModule / LightningDataModule can be named with ``class_path``; ours are
:class:`~lightning_backdoor.modules.BackdoorClassifier` and
:class:`~lightning_backdoor.data.BackdoorDataModule`. Extra top-level option: ``--test_after_fit``
(run ``test`` on the trained weights right after ``fit``, as the quickstart does).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, List, Optional

from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_only


class BackdoorCLI(LightningCLI):
    """LightningCLI with ``--test_after_fit`` and a pointer to the W&B run folder at the end."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument("--test_after_fit", type=bool, default=False,
                            help="after fit, run test on the final weights (fit subcommand only)")

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
