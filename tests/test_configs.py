"""Every YAML under configs/ parses with the CLI; the CIFAR-10 configs run ``fit`` end to end on tiny data."""

import contextlib
import importlib
import io
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from lightning_backdoor.cli import main

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
# sweep_*: W&B sweep files; configs/matrix/<grid>.yaml are matrix configs (tests/test_matrix.py), their cell_*.yaml fit configs
ALL_CONFIGS = sorted(p for p in CONFIGS.rglob("*.yaml") if not p.name.startswith("sweep_")
                     and not (p.parent.name == "matrix" and not p.name.startswith("cell_")))
CIFAR_CONFIGS = sorted((CONFIGS / "cifar10").glob("*.yaml"))


def ids(paths):
    return [str(p.relative_to(CONFIGS)) for p in paths]


@pytest.fixture(autouse=True)
def quiet_and_offline(monkeypatch, tmp_path):
    """No W&B traffic, outputs in tmp, one thread (tiny convs on a busy 2-core box are faster that way)."""
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.setattr(sys, "argv", ["lightning-backdoor"])  # not pytest's own arguments
    monkeypatch.chdir(tmp_path)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def write_cifar10(root: Path, per_file: int, seed: int = 0) -> None:
    """CIFAR-10 python pickles in the official layout (no md5 match: load with verify_integrity=False)."""
    base = root / "cifar-10-batches-py"
    base.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, size=(per_file, 3072), dtype=np.uint8)
        labels = [i % 10 for i in range(per_file)]
        with open(base / name, "wb") as f:
            pickle.dump({"data": data, "labels": labels}, f)
    with open(base / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"class{i}" for i in range(10)]}, f)


#: poison rates of the configs that do not use the 10% of the dirty-label attacks (clean-label: half the target class)
PAPER_RATES = {"label_consistent_resnet18": 0.05, "tuap_resnet18": 0.05, "narcissus_resnet18": 0.0005}

_TINY_SURROGATE = ["--data.init_args.attack.init_args.surrogate", "small_cnn",
                   "--data.init_args.attack.init_args.surrogate_epochs", "1",
                   "--data.init_args.attack.init_args.surrogate_width", "4"]
#: the fitted attacks' ``fit`` shrunk to a few steps for the fast_dev_run (the configs' own settings are paper-scale)
FAST_FIT = {
    "label_consistent_resnet18": _TINY_SURROGATE + ["--data.init_args.attack.init_args.steps", "2"],
    "tuap_resnet18": _TINY_SURROGATE + ["--data.init_args.attack.init_args.epochs", "1"],
    "narcissus_resnet18": _TINY_SURROGATE + ["--data.init_args.attack.init_args.epochs", "1"],
    "issba_resnet18": ["--data.init_args.attack.init_args.epochs", "1",
                       "--data.init_args.attack.init_args.hidden", "4",
                       "--data.init_args.attack.init_args.code_bits", "4"],
}


def test_configs_found():
    assert (CONFIGS / "quickstart.yaml") in ALL_CONFIGS
    assert {p.name for p in CIFAR_CONFIGS} >= {"badnets_resnet18.yaml", "blended_resnet18.yaml", "wanet_resnet18.yaml",
                                               "physical_ba_resnet18.yaml", "batt_resnet18.yaml",
                                               "adaptive_patch_resnet18.yaml", "adaptive_blend_resnet18.yaml"}
    assert {f"{stem}.yaml" for stem in FAST_FIT} <= {p.name for p in CIFAR_CONFIGS}


@pytest.mark.parametrize("path", ALL_CONFIGS, ids=ids(ALL_CONFIGS))
def test_config_parses(path):
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(path), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(out.getvalue())
    assert printed["model"]["class_path"] and printed["data"]["class_path"]
    assert printed["trainer"]["logger"] is not None
    logger = printed["trainer"]["logger"]
    logger = logger[0] if isinstance(logger, list) else logger
    if isinstance(logger, dict) and "WandbLogger" in logger["class_path"]:
        assert logger["init_args"]["offline"] is True


@pytest.mark.parametrize("path", CIFAR_CONFIGS, ids=ids(CIFAR_CONFIGS))
def test_cifar_config_contents(path):
    cfg = yaml.safe_load(path.read_text())
    data, model, trainer = cfg["data"]["init_args"], cfg["model"]["init_args"], cfg["trainer"]
    assert data["dataset"] == "cifar10" and data["root"] == "data/cifar10"
    # the attack's paper rate (Attack.default_rate: 10% for most, 0.3% for Adap-Patch/Adap-Blend)
    module_name, cls_name = data["attack"]["class_path"].rsplit(".", 1)
    # batch-level attacks (IAD) poison a share of every batch instead; their configs keep the data module's 0.1
    expected_rate = PAPER_RATES.get(path.stem, getattr(getattr(importlib.import_module(module_name), cls_name),
                                                       "default_rate", 0.1))
    assert data["rate"] == expected_rate and data["target"] == 0 and data["batch_size"] == 128
    assert data["num_workers"] == 4
    net = model["net"]["init_args"]
    assert model["net"]["class_path"].endswith("CifarResNet")
    assert net["num_blocks"] == [2, 2, 2, 2] and net["width"] == 64
    from lightning_backdoor.models import DATASET_STATS

    assert tuple(net["mean"]) == DATASET_STATS["cifar10"]["mean"] and tuple(net["std"]) == DATASET_STATS["cifar10"]["std"]
    assert model["optimizer"]["init_args"] == {"lr": 0.1, "momentum": 0.9, "weight_decay": 0.0005}
    assert model["scheduler"]["init_args"]["T_max"] == 200 and trainer["max_epochs"] == 200
    assert model["noise_sigmas"] == [0.05, 0.1, 0.2, 0.3]
    assert trainer["accelerator"] == "auto" and trainer["devices"] == "auto" and cfg["test_after_fit"] is True
    assert trainer["logger"]["init_args"]["offline"] is True
    callbacks = {c["class_path"].rsplit(".", 1)[-1]: c["init_args"] for c in trainer["callbacks"]}
    detectors = [d["class_path"].rsplit(".", 1)[-1] for d in callbacks["DetectionCallback"]["detectors"]]
    assert detectors == ["ScaleUp", "IBDPSC", "Strip"]
    assert callbacks["DetectionCallback"]["detectors"][0]["init_args"]["mode"] == "data_limited"
    assert callbacks["ModelCheckpoint"]["save_last"] is True


@pytest.mark.parametrize("path", CIFAR_CONFIGS, ids=ids(CIFAR_CONFIGS))
def test_cifar_config_fast_dev_run(path, tmp_path):
    root = tmp_path / "cifar10"
    write_cifar10(root, per_file=16)  # 80 train, 16 test images
    main([
        "fit", "--config", str(path),
        "--trainer.fast_dev_run", "true",
        "--trainer.accelerator", "cpu",
        "--trainer.devices", "1",
        "--trainer.enable_progress_bar", "false",
        "--model.init_args.net.init_args.width", "8",
        "--data.init_args.root", str(root),
        "--data.init_args.verify_integrity", "false",
        "--data.init_args.num_workers", "0",
        "--data.init_args.val_size", "8",
        "--data.init_args.defense_size", "8",
        *FAST_FIT.get(path.stem, []),
    ])
    assert not (tmp_path / "wandb").exists()  # W&B disabled: nothing written, nothing sent


def _detection_args(cfg):
    cbs = (cfg.get("trainer") or {}).get("callbacks") or []
    return [cb.get("init_args", {}) for cb in cbs if str(cb.get("class_path", "")).endswith("DetectionCallback")]


PROTOCOL_CONFIGS = sorted(set((CONFIGS / "cifar10").glob("*.yaml")) | set((CONFIGS / "adaptive").rglob("*.yaml"))
                          | set((CONFIGS / "distributed").glob("*.yaml")))
PROTOCOL_CONFIGS = [p for p in PROTOCOL_CONFIGS if not p.name.startswith("sweep_")]


@pytest.mark.parametrize("path", PROTOCOL_CONFIGS, ids=ids(PROTOCOL_CONFIGS))
def test_paper_scale_and_adaptive_configs_follow_the_papers_protocol(path):
    """Noise-augmented copies (sigma 0.05) on; paper-scale configs fit data-limited detectors on >= 100 per class."""
    cfg = yaml.safe_load(path.read_text())
    dets = _detection_args(cfg)
    assert dets, f"{path.name} runs no DetectionCallback"
    for args in dets:
        assert args.get("noise_copies") is True and args.get("noise_magnitude", 0.05) == 0.05, path.name
    data = cfg["data"]["init_args"]
    if data.get("dataset") == "cifar10":
        for args in dets:
            assert args.get("fit_samples") is None or args["fit_samples"] >= 1000
        assert data.get("defense_size", 0) >= 1000  # stratified: >= 100 per class of CIFAR-10


def test_iad_mnist5k_checkpoint_reproduces_its_asr_with_test(tmp_path):
    """The IAD config on the embedded digits (a few steps: mask pre-training, then both optimisers): fit writes the
    generators into the checkpoint, and `test --ckpt_path` with the same config gets exactly the same BA and ASR."""
    from lightning_backdoor.cli import run_cli

    small = ["--config", str(CONFIGS / "iad_mnist5k.yaml"), "--trainer.accelerator", "cpu",
             "--trainer.enable_progress_bar", "false", "--trainer.logger", "false", "--trainer.callbacks", "[]",
             "--model.init_args.net.init_args.width", "4", "--data.init_args.attack.init_args.hidden", "4",
             "--data.init_args.attack.init_args.mask_pretrain_steps", "1", "--data.init_args.val_size", "50",
             "--data.init_args.test_size", "60", "--data.init_args.defense_size", "50",
             "--data.init_args.batch_size", "32", "--data.init_args.eval_batch_size", "60"]
    fit = run_cli(["fit", *small, "--trainer.max_steps", "3", "--trainer.limit_val_batches", "1",
                   "--trainer.enable_checkpointing", "true", "--trainer.default_root_dir", str(tmp_path / "run"),
                   "--test_after_fit", "true"])
    asr = float(fit.trainer.callback_metrics["test/asr"])
    ckpt = next((tmp_path / "run").rglob("*.ckpt"))
    test = run_cli(["test", *small, "--ckpt_path", str(ckpt)])
    assert float(test.trainer.callback_metrics["test/asr"]) == asr
    assert float(test.trainer.callback_metrics["test/ba"]) == float(fit.trainer.callback_metrics["test/ba"])
