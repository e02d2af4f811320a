"""Checkpoints are read with weights_only=True: pickled code is refused (and never runs), other architectures
are refused with the differing keys and shapes, and our own checkpoints load under that restriction."""

import sys
from pathlib import Path

import pytest
import torch

from lightning_backdoor.checkpoints import UnsafeCheckpointError
from lightning_backdoor.cli import main

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "configs" / "quickstart.yaml"
SMALL = ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "2",
         "--trainer.limit_test_batches", "2", "--trainer.enable_progress_bar", "false", "--trainer.logger", "false",
         "--trainer.num_sanity_val_steps", "0", "--trainer.accelerator", "cpu",
         "--data.init_args.batch_size", "16", "--data.init_args.eval_batch_size", "16",
         "--model.init_args.net.init_args.width", "4", "--model.init_args.noise_sigmas", "[]"]


class Payload:
    """Unpickling this would run code: it writes a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('code ran')",))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, one_thread):
    """A quickstart checkpoint (tiny settings) written by the CLI."""
    tmp = tmp_path_factory.mktemp("cli")
    mp = pytest.MonkeyPatch()
    mp.chdir(tmp)
    mp.setattr(sys, "argv", ["lightning-backdoor"])
    try:
        main(["fit", "--config", str(QUICKSTART), *SMALL, "--test_after_fit", "false"])
    finally:
        mp.undo()
    ckpt = tmp / "checkpoints" / "quickstart" / "last.ckpt"
    assert ckpt.is_file()
    return ckpt


@pytest.fixture
def in_tmp(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["lightning-backdoor"])
    return tmp_path


def evil_checkpoint(path: Path, marker: Path, trained: Path) -> Path:
    ckpt = torch.load(trained, weights_only=True)
    ckpt["hyper_parameters"]["payload"] = Payload(marker)
    torch.save(ckpt, path)
    return path


def test_our_checkpoints_load_with_weights_only(trained):
    ckpt = torch.load(trained, map_location="cpu", weights_only=True)  # raises if anything is not plain
    for key in ("state_dict", "hyper_parameters", "datamodule_hyper_parameters", "BackdoorDataModule", "callbacks"):
        assert key in ckpt, key
    assert "attack_state" in ckpt["BackdoorDataModule"] and "poison_indices" in ckpt["BackdoorDataModule"]


def test_cli_tests_a_checkpoint_with_weights_only_by_default(trained, in_tmp):
    main(["test", "--config", str(QUICKSTART), *SMALL, "--ckpt_path", str(trained),
          "--trainer.callbacks.init_args.max_samples", "16"])


def test_malicious_checkpoint_is_refused_and_never_runs(trained, in_tmp):
    marker = in_tmp / "pwned.txt"
    evil = evil_checkpoint(in_tmp / "evil.ckpt", marker, trained)
    with pytest.raises(UnsafeCheckpointError, match="refused by weights_only loading.*GLOBAL exec"):
        main(["test", "--config", str(QUICKSTART), *SMALL, "--ckpt_path", str(evil)])
    assert not marker.exists()
    from lightning_backdoor import BackdoorDataModule

    with pytest.raises(UnsafeCheckpointError):
        BackdoorDataModule.from_checkpoint(evil)
    assert not marker.exists()


def test_checkpoint_of_another_architecture_names_keys_and_shapes(trained, in_tmp):
    with pytest.raises(ValueError, match=r"does not match the model(.|\n)*shape mismatches: net\.conv1\.weight: "
                                         r"checkpoint \[4, 1, 3, 3\] vs model \[8, 1, 3, 3\]"):
        main(["test", "--config", str(QUICKSTART), *SMALL, "--ckpt_path", str(trained),
              "--model.init_args.net.init_args.width", "8"])
    with pytest.raises(ValueError, match=r"net\.fc\.weight: checkpoint \[10, 16\] vs model \[5, 16\]"):
        main(["test", "--config", str(QUICKSTART), *SMALL, "--ckpt_path", str(trained),
              "--model.init_args.net.init_args.num_classes", "5"])
