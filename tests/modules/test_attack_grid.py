"""The clean / poisoned / difference picture of the run's attack: its layout, and one W&B image per run."""

from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from tiny_net import TinyResNet
from lightning_backdoor import BackdoorClassifier, BackdoorDataModule
from lightning_backdoor.attacks import AdaptiveBlend, BadNets, BATT
from lightning_backdoor.attacks.preview import trigger_grid, trigger_rows
from lightning_backdoor.wandb_utils import read_offline_run


def test_trigger_rows_and_grid_layout():
    x = torch.rand(3, 1, 10, 12, generator=torch.Generator().manual_seed(0))
    a = BadNets(seed=0)
    rows = trigger_rows(a, x)
    assert list(rows) == ["clean", "poisoned", "difference"]
    grid = trigger_grid(rows, pad=1)
    assert grid.shape == (3 * 11 - 1, 3 * 13 - 1, 3) and grid.dtype == np.uint8
    poisoned = a(x)
    diff = (poisoned - x).abs()
    for i in range(3):  # each cell is the image, grey repeated over RGB
        cell = grid[11:21, i * 13:i * 13 + 12]
        assert np.array_equal(cell[..., 0], cell[..., 2])
        assert np.array_equal(cell[..., 0], (poisoned[i, 0].numpy() * 255).round().astype(np.uint8))
        ref = (diff[i, 0] / diff.max()).numpy()
        assert np.array_equal(grid[22:32, i * 13:i * 13 + 12, 1], (ref * 255).round().astype(np.uint8))
    assert (grid[10, :, :] == 89).all()  # the grey gap between rows (0.35 * 255)
    assert list(trigger_rows(AdaptiveBlend(), x)) == ["clean", "poisoned", "train-time poisoned", "difference"]
    assert list(trigger_rows(BATT(), x)) == ["clean", "poisoned", "clean (train-time)", "difference"]
    with pytest.raises(ValueError, match="same number of images"):
        trigger_grid({"a": x, "b": x[:2]})


def _fit(tmp_path, logger, ckpt=None, max_epochs=1, callbacks=()):
    dm = BackdoorDataModule("mnist5k", attack=AdaptiveBlend(seed=0), rate=0.01, val_size=20, defense_size=10,
                            test_size=30, batch_size=16)
    trainer = L.Trainer(max_epochs=max_epochs, limit_train_batches=1, limit_val_batches=0, logger=logger,
                        accelerator="cpu", devices=1, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=list(callbacks), enable_checkpointing=bool(callbacks),
                        default_root_dir=str(tmp_path))
    trainer.fit(BackdoorClassifier(TinyResNet(width=4)), dm, ckpt_path=ckpt)
    return trainer


def test_grid_logged_once_per_run_to_wandb(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "offline")
    from lightning.pytorch.loggers import WandbLogger

    logger = WandbLogger(project="lb-test", save_dir=str(tmp_path), offline=True)
    calls = []
    original = logger.log_image
    monkeypatch.setattr(logger, "log_image", lambda **kw: (calls.append(kw["key"]), original(**kw)))
    _fit(tmp_path, logger, callbacks=[ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)])
    run_dir = Path(logger.experiment.dir).parent
    logger.experiment.finish()
    summary = read_offline_run(run_dir, wait=30)["summary"]
    assert summary["attack/trigger_grid/_type"].startswith("images")
    assert summary["attack/trigger_grid/captions"][0].startswith("adaptive_blend: rows clean / poisoned")
    assert (run_dir / "files" / summary["attack/trigger_grid/filenames"][0]).is_file()
    assert calls == ["attack/trigger_grid"]
    # a resumed fit of the same run does not log it again
    again = []
    class Recorder(WandbLogger):
        def log_image(self, key, images, step=None, **kwargs):
            again.append(key)
    resumed = Recorder(project="lb-test", save_dir=str(tmp_path / "r"), offline=True)
    _fit(tmp_path, resumed, ckpt=str(tmp_path / "ckpt" / "last.ckpt"), max_epochs=2,
         callbacks=[ModelCheckpoint(dirpath=tmp_path / "ckpt2")])
    resumed.experiment.finish()
    assert again == []
