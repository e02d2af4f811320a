"""The lightning-backdoor console script (LightningCLI) on the quickstart config, kept to seconds."""

import subprocess
import sys
from pathlib import Path

import pytest

from lightning_backdoor.cli import main
from lightning_backdoor.wandb_utils import read_offline_run

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "configs" / "quickstart.yaml"
FAST = ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1",
        "--trainer.limit_test_batches", "1", "--trainer.enable_progress_bar", "false"]


def test_quickstart_fast_dev_run_from_another_directory(tmp_path):
    """The installed console script works from any cwd: data from the package, outputs under the cwd."""
    exe = Path(sys.executable).parent / "lightning-backdoor"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "lightning_backdoor.cli"]
    proc = subprocess.run(cmd + ["fit", "--config", str(QUICKSTART), *FAST, "--trainer.max_steps", "1",
                                 "--trainer.callbacks.init_args.max_samples", "20",
                                 "--trainer.callbacks.init_args.fit_samples", "50"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600,
                          env={**__import__("os").environ, "WANDB_MODE": "offline"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "wandb sync" in proc.stdout
    assert list((tmp_path / "wandb").glob("offline-run-*")), "W&B run folder should be under the cwd"


def test_quickstart_logs_ba_asr_and_backdoor_config_to_wandb(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    main(["fit", "--config", str(QUICKSTART), *FAST,
          "--trainer.callbacks.init_args.max_samples", "40", "--trainer.callbacks.init_args.fit_samples", "50"])
    out = capsys.readouterr().out
    assert "W&B run folder:" in out and "wandb sync" in out
    run_dir = next((tmp_path / "wandb").glob("offline-run-*"))
    import wandb

    if wandb.run is not None:
        wandb.run.finish()
    run = read_offline_run(run_dir, wait=30)
    summary, config = run["summary"], run["config"]
    for key in ("test/ba", "test/asr", "val/ba", "val/asr", "test/asr@noise0.1", "test/scale_up/auroc",
                "test/ibd_psc/relative_cost", "test/strip/f1"):
        assert key in summary or key.startswith("test/ibd_psc"), (key, sorted(summary))
    backdoor = config["backdoor"]
    assert backdoor["attack"] == "badnets" and backdoor["target"] == 0 and backdoor["poison_rate"] == 0.1
    assert backdoor["attack_params"]["patch_size"] == 3
    assert len(backdoor["poison_fingerprint"]) == 16


def test_unknown_config_key_is_rejected(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(QUICKSTART), "--data.init_args.poison_rat", "0.1"])
    assert "poison_rat" in capsys.readouterr().err


def test_unknown_attack_name_lists_known(tmp_path):
    from lightning_backdoor.attacks import create_attack
    from lightning_backdoor.models import create_model

    with pytest.raises(ValueError, match="badnets"):
        create_attack("badnet")
    with pytest.raises(ValueError, match="resnet18"):
        create_model("resnet-18")


def test_detect_config_runs_on_a_checkpoint(tmp_path, monkeypatch):
    """configs/detect.yaml: `test --ckpt_path` on a checkpoint made by a short quickstart fit."""
    monkeypatch.chdir(tmp_path)
    main(["fit", "--config", str(QUICKSTART), *FAST, "--trainer.max_steps", "1", "--trainer.logger", "false",
          "--trainer.callbacks", "[]", "--trainer.enable_checkpointing", "true",
          "--trainer.default_root_dir", str(tmp_path), "--test_after_fit", "false"])
    ckpt = next(tmp_path.rglob("*.ckpt"))
    main(["test", "--config", str(ROOT / "configs" / "detect.yaml"), "--ckpt_path", str(ckpt),
          "--trainer.limit_test_batches", "1", "--trainer.enable_progress_bar", "false",
          "--trainer.callbacks.init_args.max_samples", "20", "--trainer.callbacks.init_args.fit_samples", "30",
          "--trainer.callbacks.init_args.noise_copies", "false"])
    run_dir = next((tmp_path / "wandb").glob("offline-run-*"))
    import wandb

    if wandb.run is not None:
        wandb.run.finish()
    summary = read_offline_run(run_dir, wait=30)["summary"]
    for det in ("scale_up", "strip"):
        for metric in ("auroc", "f1", "tpr@fpr1", "tpr@fpr5", "relative_cost"):
            assert f"test/{det}/{metric}" in summary, (det, metric, sorted(summary))


def test_run_cli_args_do_not_warn_about_the_process_command_line(monkeypatch):
    """A matrix cell runs `run_cli([...])` inside `lightning-backdoor matrix --config ...`: the explicit args are the
    cell's whole command line, so Lightning's "provide both args and command line arguments" warning must not be
    printed once per cell, and the process's sys.argv is left as it was."""
    import warnings

    from lightning_backdoor.cli import run_cli

    argv = ["lightning-backdoor", "matrix", "--config", "grid.yaml"]
    monkeypatch.setattr(sys, "argv", list(argv))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(SystemExit):  # parsed, then refused: validate without a checkpoint
            run_cli(["validate", "--config", str(QUICKSTART)])
    assert not [w for w in caught if "args parameter is intended" in str(w.message)]
    assert sys.argv == argv
