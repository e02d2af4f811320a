"""configs/sanitize/*.yaml: the sanitised config builds its sanitiser from YAML and runs end to end (fast_dev_run)."""

import sys
from pathlib import Path

import pytest
import torch
import yaml

from lightning_backdoor.cli import main

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "sanitize"


@pytest.fixture(autouse=True)
def quiet_and_offline(monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.setattr(sys, "argv", ["lightning-backdoor"])
    monkeypatch.chdir(tmp_path)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_the_twins_differ_only_by_the_sanitiser():
    sanitised = yaml.safe_load((CONFIGS / "badnets_sphere.yaml").read_text())
    plain = yaml.safe_load((CONFIGS / "badnets_none.yaml").read_text())
    sanitizer = sanitised["data"]["init_args"].pop("sanitizer")
    assert sanitizer["class_path"] == "lightning_backdoor.sanitizers.Sphere"
    assert sanitizer["init_args"]["mode"] == "oracle" and sanitizer["init_args"]["percentile"] == 70
    for cfg in (sanitised, plain):
        cfg["trainer"]["logger"]["init_args"].pop("name")
        cfg["trainer"]["callbacks"][0]["init_args"].pop("dirpath")
    assert sanitised == plain


def test_sanitised_config_fast_dev_run():
    main(["fit", "--config", str(CONFIGS / "badnets_sphere.yaml"), "--trainer.fast_dev_run", "true",
          "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false",
          "--model.init_args.net.init_args.width", "4", "--data.init_args.eval_batch_size", "64",
          "--data.init_args.val_size", "64"])
