"""configs/neural_cleanse.yaml (test on a checkpoint) and configs/neural_cleanse_unlearn.yaml (fine-tune) end to end."""

import os
import sys
from pathlib import Path

import pytest
import torch
import yaml

from lightning_backdoor.cli import main, run_cli

ROOT = Path(__file__).resolve().parents[2]
FAST = ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1",
        "--trainer.limit_test_batches", "1", "--trainer.enable_progress_bar", "false"]
SMALL = ["--model.init_args.net.init_args.width", "4", "--data.init_args.eval_batch_size", "50",
         "--data.init_args.batch_size", "16"]  # a narrow net and small batches: seconds, not minutes


@pytest.fixture(autouse=True)
def _quiet(monkeypatch, tmp_path):
    monkeypatch.setattr(sys, "argv", ["lightning-backdoor"])
    monkeypatch.chdir(tmp_path)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def quickstart_ckpt(tmp_path_factory) -> Path:
    """One short quickstart fit (a narrow ResNet-20) shared by both tests."""
    tmp_path = tmp_path_factory.mktemp("quickstart")
    old_argv, old_cwd = sys.argv, os.getcwd()
    sys.argv = ["lightning-backdoor"]
    os.chdir(tmp_path)
    try:
        _fit_quickstart(tmp_path)
    finally:
        sys.argv = old_argv
        os.chdir(old_cwd)
    return next((tmp_path / "qs").rglob("*.ckpt"))


def _fit_quickstart(tmp_path: Path) -> None:
    main(["fit", "--config", str(ROOT / "configs" / "quickstart.yaml"), *FAST, *SMALL, "--trainer.max_steps", "1",
          "--trainer.logger", "false", "--trainer.callbacks", "[]", "--trainer.enable_checkpointing", "true",
          "--trainer.default_root_dir", str(tmp_path / "qs"), "--test_after_fit", "false"])


def _tiny(cleanse: dict) -> None:
    cleanse["init_args"].update(steps=3, batch_size=4, max_samples=20)


def test_neural_cleanse_config_runs_on_a_checkpoint(tmp_path, monkeypatch, quickstart_ckpt):
    monkeypatch.setenv("WANDB_MODE", "disabled")  # the W&B read-back is tests/callbacks/test_neural_cleanse_callback.py
    ckpt = quickstart_ckpt
    cfg = yaml.safe_load((ROOT / "configs" / "neural_cleanse.yaml").read_text())
    nc_cb, det_cb = cfg["trainer"]["callbacks"]
    _tiny(nc_cb["init_args"]["cleanse"])
    _tiny(det_cb["init_args"]["detectors"][0]["init_args"]["cleanse"])
    det_cb["init_args"].update(max_samples=20, fit_samples=30, noise_copies=False)
    path = tmp_path / "nc.yaml"
    path.write_text(yaml.safe_dump(cfg))
    cli = run_cli(["test", "--config", str(path), "--ckpt_path", str(ckpt), *SMALL, "--trainer.limit_test_batches",
                   "1", "--trainer.enable_progress_bar", "false"])
    logged = cli.trainer.callback_metrics
    for key in ("anomaly_index", "flagged", "target_flagged", "l1/0", "l1/9"):
        assert f"test/neural_cleanse/{key}" in logged, (key, sorted(logged))
    for metric in ("auroc", "f1", "tpr@fpr5", "relative_cost"):
        assert f"test/neural_cleanse_filter/{metric}" in logged
    assert "test/ba" in logged and "test/asr" in logged


def test_unlearning_config_fine_tunes_the_quickstart_checkpoint(tmp_path, monkeypatch, quickstart_ckpt):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    ckpt = quickstart_ckpt
    cfg = yaml.safe_load((ROOT / "configs" / "neural_cleanse_unlearn.yaml").read_text())
    _tiny(cfg["model"]["init_args"]["losses"][0]["init_args"]["cleanse"])
    _tiny(cfg["trainer"]["callbacks"][1]["init_args"]["cleanse"])
    assert cfg["data"]["class_path"].endswith("DefenseFinetuneDataModule")
    assert cfg["model"]["init_args"]["losses"][0]["init_args"]["stamp_rate"] == 0.2
    path = tmp_path / "unlearn.yaml"
    path.write_text(yaml.safe_dump(cfg))
    main(["fit", "--config", str(path), *FAST, *SMALL, "--model.init_args.init_weights", str(ckpt)])
    out = tmp_path / "checkpoints" / "neural_cleanse" / "unlearn" / "last.ckpt"
    state = torch.load(out, weights_only=True)  # the loss term's reversed triggers are plain tensors
    extra = state["state_dict"]["loss_terms.0._extra_state"]
    assert extra["fitted"] and extra["masks"].shape == (1, 1, 28, 28)
    assert float(extra["masks"].min()) >= 0 and float(extra["masks"].max()) <= 1
