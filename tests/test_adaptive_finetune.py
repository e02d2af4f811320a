"""Fine-tuning adaptive attacks from a checkpoint: configs/adaptive/*.yaml end to end, weight loading, errors.

The vanilla checkpoint is made the documented way (the quickstart config, cut to two training steps),
so these tests also check that the quickstart writes checkpoints/quickstart/last.ckpt.
"""

import itertools
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
import yaml
from lightning.pytorch import Callback
from lightning.pytorch.loggers import WandbLogger

from lightning_backdoor import BackdoorClassifier, BackdoorDataModule
from lightning_backdoor import cli as cli_module
from lightning_backdoor.attacks import BadNets
from lightning_backdoor.checkpoints import UnsafeCheckpointError, load_net_weights
from lightning_backdoor.cli import main
from lightning_backdoor.models import CifarResNet
from lightning_backdoor.wandb_utils import read_offline_run

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "configs" / "quickstart.yaml"
ADAPTIVE = ROOT / "configs" / "adaptive"
TERMS = {"scale_up": "scale_up_adaptive", "ibd_psc_design1": "ibd_psc_adaptive", "ibd_psc_design2": "ibd_psc_adaptive"}
# limit_*_batches: "1" would parse as the float 1.0 (= all batches), so 2 batches of eval_batch_size images
FAST = ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "2",
        "--trainer.limit_test_batches", "2", "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false", "--trainer.num_sanity_val_steps", "0",
        "--data.init_args.eval_batch_size", "32"]
DETECT_FAST = ["--trainer.callbacks.init_args.max_samples", "30", "--trainer.callbacks.init_args.fit_samples", "60",
               "--trainer.callbacks.init_args.progress", "false", "--trainer.callbacks.init_args.plots", "false"]


def quickstart_net(num_classes: int = 10, width: int = 16) -> CifarResNet:
    return CifarResNet(num_blocks=[3, 3, 3], width=width, num_classes=num_classes, in_channels=1,
                       mean=[0.1307], std=[0.3081])


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["lightning-backdoor"])  # not pytest's own arguments
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny convs on a busy 2-core machine run faster on one thread
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A working directory holding the quickstart's checkpoints/quickstart/last.ckpt (two training steps)."""
    cwd = tmp_path_factory.mktemp("adaptive")
    old = os.getcwd()
    os.chdir(cwd)
    argv, sys.argv = sys.argv, ["lightning-backdoor"]
    try:
        main(["fit", "--config", str(QUICKSTART), "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2",
              "--trainer.limit_val_batches", "0", "--trainer.logger", "false", "--trainer.enable_progress_bar",
              "false", "--trainer.enable_model_summary", "false", "--test_after_fit", "false"])
    finally:
        os.chdir(old)
        sys.argv = argv
    assert (cwd / "checkpoints" / "quickstart" / "last.ckpt").is_file(), sorted(map(str, cwd.rglob("*.ckpt")))
    return cwd


@pytest.fixture
def vanilla_ckpt(workdir) -> Path:
    return workdir / "checkpoints" / "quickstart" / "last.ckpt"


def run_cli(args, monkeypatch):
    """``lightning_backdoor.cli.main(args)``, returning the CLI object (its trainer, model, loggers)."""
    created = []

    class Recording(cli_module.BackdoorCLI):
        def __init__(self, *a, **kw):
            created.append(self)
            super().__init__(*a, **kw)

    monkeypatch.setattr(cli_module, "BackdoorCLI", Recording)
    main(args)
    return created[0]


def finish_and_read_wandb(cli, required, timeout: float = 60.0):
    """Finish the CLI's own W&B run and read its offline folder back once ``required`` keys are in it.

    ``wandb.run`` need not be the CLI's run when runs come and go in one process, and the W&B
    service can still be writing the file when ``finish()`` returns, hence the polling.
    """
    (logger,) = [lg for lg in cli.trainer.loggers if isinstance(lg, WandbLogger)]
    run_dir = Path(logger.experiment.dir).parent
    logger.experiment.finish()
    deadline = time.monotonic() + timeout
    while True:
        run = read_offline_run(run_dir)
        logged = set(run["summary"]) | {k for row in run["history"] for k in row}
        if set(required) <= logged or time.monotonic() > deadline:
            return run, logged
        time.sleep(0.5)


@pytest.mark.parametrize("name", sorted(TERMS))
def test_adaptive_config_fine_tunes_from_the_quickstart_checkpoint(name, workdir, monkeypatch):
    """`fit --config configs/adaptive/<name>.yaml` (default init_weights) logs the loss term, BA/ASR/noise and detectors."""
    monkeypatch.chdir(workdir)
    monkeypatch.setenv("WANDB_MODE", "offline")
    # an absolute save_dir: the W&B service process keeps the cwd of the first run in this pytest process
    cli = run_cli(["fit", "--config", str(ADAPTIVE / f"{name}.yaml"), *FAST, *DETECT_FAST,
                   "--trainer.logger.init_args.save_dir", str(workdir)], monkeypatch)
    term = TERMS[name]
    required = [f"train/loss/{term}_epoch", "train/loss/bd_epoch"] + [
        f"{stage}/{key}" for stage in ("val", "test")
        for key in ("ba", "asr", "asr@noise0.05", "asr@noise0.3", "scale_up/auroc", "ibd_psc/auroc", "strip/auroc")]
    run, logged = finish_and_read_wandb(cli, required)
    assert Path(cli.trainer.loggers[0].save_dir) == workdir
    for key in required:
        assert key in logged, (key, sorted(logged))
    config = run["config"]
    val_rows = [row for row in run["history"] if "val/scale_up/auroc" in row]
    assert val_rows and all("val/ibd_psc/auroc" in row and "val/ba" in row for row in val_rows)  # same epoch
    assert config["init_weights"] == "checkpoints/quickstart/last.ckpt"
    if term == "ibd_psc_adaptive":
        assert int(config["loss/ibd_psc_adaptive/k"]) >= 1


def test_init_weights_override_and_architecture_mismatch_via_cli(workdir, monkeypatch):
    monkeypatch.chdir(workdir)
    args = ["fit", "--config", str(ADAPTIVE / "scale_up.yaml"), *FAST, "--trainer.logger", "false"]
    # refused in one line before anything starts (no trainer, no W&B run)
    with pytest.raises(SystemExit, match=r"checkpoint 'elsewhere.ckpt' \(--model.init_args.init_weights\) not found"):
        main(args + ["--model.init_args.init_weights", "elsewhere.ckpt"])
    with pytest.raises(ValueError, match=r"(?s)last\.ckpt.*does not match.*conv1\.weight: checkpoint \[16, 1, 3, 3\] "
                                         r"vs model \[8, 1, 3, 3\]"):
        main(args + ["--model.init_args.net.init_args.width", "8"])


def test_missing_quickstart_checkpoint_says_what_to_run_first(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no checkpoints/ here
    for name in ("scale_up", "ibd_psc_design1", "ibd_psc_design2"):
        with pytest.raises(SystemExit) as err:
            main(["fit", "--config", str(ADAPTIVE / f"{name}.yaml")])
        msg = str(err.value)
        assert "checkpoints/quickstart/last.ckpt" in msg and "not found" in msg
        assert f"lightning-backdoor fit --config {os.path.relpath(QUICKSTART)}` first" in msg
        assert "\n" not in msg  # one line
    assert not (tmp_path / "wandb").exists()  # refused before a W&B run started


def test_mismatch_lists_missing_unexpected_and_shapes(vanilla_ckpt):
    with pytest.raises(ValueError) as err:
        load_net_weights(quickstart_net(num_classes=43), vanilla_ckpt)
    msg = str(err.value)
    assert str(vanilla_ckpt) in msg and "fc.weight: checkpoint [10, 64] vs model [43, 64]" in msg
    assert "fc.bias: checkpoint [10] vs model [43]" in msg and "missing" not in msg
    deeper = CifarResNet(num_blocks=[4, 3, 3], width=16, num_classes=10, in_channels=1)
    with pytest.raises(ValueError, match=r"(?s)missing keys \(\d+, .*layer1\.3\.conv1\.weight"):
        load_net_weights(deeper, vanilla_ckpt)
    shallower = CifarResNet(num_blocks=[2, 3, 3], width=16, num_classes=10, in_channels=1)
    with pytest.raises(ValueError, match=r"(?s)unexpected keys \(\d+, .*layer1\.2\.conv1\.weight"):
        load_net_weights(shallower, vanilla_ckpt)


def _assert_net_equals(net, state, prefix=""):
    own = net.state_dict()
    assert set(own) == {k[len(prefix):] for k in state if k.startswith(prefix)}
    for k, v in own.items():
        assert torch.equal(v, state[prefix + k]), k


def test_weights_are_loaded_from_lightning_and_plain_files(vanilla_ckpt, tmp_path):
    ckpt = torch.load(vanilla_ckpt, map_location="cpu", weights_only=True)
    torch.manual_seed(1)
    module = BackdoorClassifier(quickstart_net(), init_weights=str(vanilla_ckpt))
    assert not torch.equal(module.net.conv1.weight, ckpt["state_dict"]["net.conv1.weight"])  # not at construction
    module.setup("fit")
    _assert_net_equals(module.net, ckpt["state_dict"], "net.")
    plain = {k[4:]: v for k, v in ckpt["state_dict"].items() if k.startswith("net.")}
    for name, state in (("plain.pt", plain), ("ddp.pt", {"module." + k: v for k, v in plain.items()})):
        torch.save(state, tmp_path / name)
        net = load_net_weights(quickstart_net(), tmp_path / name)
        _assert_net_equals(net, plain)


def test_weights_are_loaded_once_not_again_for_test_after_fit(vanilla_ckpt):
    module = BackdoorClassifier(quickstart_net(), init_weights=str(vanilla_ckpt))
    module.setup("fit")
    with torch.no_grad():
        module.net.fc.bias.fill_(3.0)  # "fine-tuned"
    module.setup("test")
    assert bool((module.net.fc.bias == 3.0).all())
    restored = BackdoorClassifier(quickstart_net(), init_weights="a/file/that/is/gone.ckpt")
    restored.on_load_checkpoint({"state_dict": {}})  # load_from_checkpoint / --ckpt_path: their weights win
    restored.setup("test")
    resumed = BackdoorClassifier(quickstart_net(), init_weights="a/file/that/is/gone.ckpt")
    resumed._trainer = SimpleNamespace(ckpt_path="run/last.ckpt", datamodule=None)  # fit(..., ckpt_path=...)
    resumed.setup("fit")  # resume restores the full state: init_weights is not read


class RecordOptimizerAtStart(Callback):
    def on_train_start(self, trainer, pl_module):
        opt = trainer.optimizers[0]
        self.state_sizes = [len(s) for s in opt.state.values()]
        self.lr = opt.param_groups[0]["lr"]
        self.epoch, self.step = trainer.current_epoch, trainer.global_step
        self.weights = {k: v.detach().clone() for k, v in pl_module.net.state_dict().items()}


def test_fine_tuning_starts_with_fresh_optimizer_and_counters(vanilla_ckpt):
    ckpt = torch.load(vanilla_ckpt, map_location="cpu", weights_only=True)
    assert ckpt["optimizer_states"][0]["state"] and ckpt["global_step"] == 2  # SGD momentum buffers exist
    dm = BackdoorDataModule("mnist5k", attack=BadNets(seed=0), target=0, rate=0.1, batch_size=64)
    module = BackdoorClassifier(quickstart_net(), optimizer=lambda p: torch.optim.SGD(p, lr=0.003, momentum=0.9),
                                init_weights=str(vanilla_ckpt))
    record = RecordOptimizerAtStart()
    trainer = L.Trainer(max_epochs=1, limit_train_batches=1, limit_val_batches=0, accelerator="cpu", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[record])
    trainer.fit(module, dm)
    assert record.state_sizes == [] and record.lr == 0.003 and (record.epoch, record.step) == (0, 0)
    for k, v in record.weights.items():  # the checkpoint's weights, as the first step sees them
        assert torch.equal(v, ckpt["state_dict"]["net." + k]), k


class Payload:
    """Unpickling this runs code: it opens (creates) a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_checkpoint_with_pickled_objects_is_refused(vanilla_ckpt, tmp_path):
    marker = tmp_path / "code_ran"
    state = torch.load(vanilla_ckpt, map_location="cpu", weights_only=True)
    state["extra"] = Payload(marker)
    torch.save(state, tmp_path / "unsafe.ckpt")
    module = BackdoorClassifier(quickstart_net(), init_weights=str(tmp_path / "unsafe.ckpt"))
    with pytest.raises(UnsafeCheckpointError, match=r"(?s)unsafe\.ckpt.*refused by weights_only loading"):
        module.setup("fit")
    assert not marker.exists()
    assert issubclass(UnsafeCheckpointError, ValueError)


def test_missing_file_and_bad_arguments(tmp_path):
    module = BackdoorClassifier(quickstart_net(), init_weights=str(tmp_path / "nope.ckpt"))
    with pytest.raises(FileNotFoundError, match="nope.ckpt"):
        module.setup("fit")
    with pytest.raises(IsADirectoryError, match="last.ckpt"):
        load_net_weights(quickstart_net(), tmp_path)
    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.ckpt"):
        load_net_weights(quickstart_net(), tmp_path / "junk.ckpt")
    torch.save({"weights": [1, 2]}, tmp_path / "odd.pt")
    with pytest.raises(ValueError, match=r"odd\.pt.*\['weights'\] are not tensors"):
        load_net_weights(quickstart_net(), tmp_path / "odd.pt")
    torch.save([torch.zeros(1)], tmp_path / "list.pt")
    with pytest.raises(ValueError, match="holds no state_dict"):
        load_net_weights(quickstart_net(), tmp_path / "list.pt")
    with pytest.raises(TypeError, match="init_weights"):
        BackdoorClassifier(quickstart_net(), init_weights=3)
    with pytest.raises(ValueError, match="init_weights"):
        BackdoorClassifier(quickstart_net(), init_weights="")


@pytest.mark.parametrize("path", sorted(ADAPTIVE.glob("sweep_*.yaml")), ids=lambda p: p.name)
def test_sweep_files_build_valid_commands(path, capsys):
    """Each grid point of a W&B sweep file, as the agent would expand ${args}, parses with the CLI."""
    sweep = yaml.safe_load(path.read_text())
    assert sweep["method"] == "grid" and sweep["program"] == "lightning-backdoor"
    command = sweep["command"]
    assert command[:3] == ["${env}", "lightning-backdoor", "fit"] and command[-1] == "${args}"
    assert "--trainer.logger.init_args.offline=false" in command  # a sweep agent needs an online run
    names = list(sweep["parameters"])
    grid = list(itertools.product(*(sweep["parameters"][n]["values"] for n in names)))
    for point in (grid[0], grid[-1]):
        args = [f"--{n}={v}" for n, v in zip(names, point)]
        config_args = [a if not a.startswith("configs/") else str(ROOT / a) for a in command[2:-1]]
        with pytest.raises(SystemExit) as exit_info:
            main(config_args + args + ["--print_config"])
        assert exit_info.value.code in (0, None)
        printed = yaml.safe_load(capsys.readouterr().out)
        loss = printed["model"]["init_args"]["losses"][0]["init_args"]
        for n, v in zip(names, point):
            assert loss[n.rsplit(".", 1)[-1]] == v


def test_adaptive_configs_match_the_issue():
    for name in TERMS:
        for path in (ADAPTIVE / f"{name}.yaml", ADAPTIVE / "cifar10" / f"{name}.yaml"):
            cfg = yaml.safe_load(path.read_text())
            model = cfg["model"]["init_args"]
            assert model["init_weights"] and model["noise_sigmas"] == [0.05, 0.1, 0.2, 0.3], path
            assert len(model["losses"]) == 1 and cfg["test_after_fit"] is True
            assert cfg["trainer"]["logger"]["init_args"]["offline"] is True
            det = cfg["trainer"]["callbacks"][-1]["init_args"]
            assert det["every_n_epochs"] == 1 and det["stages"] == ["validate", "test"]
            kinds = [d["class_path"].rsplit(".", 1)[-1] for d in det["detectors"]]
            assert kinds[:2] == ["ScaleUp", "IBDPSC"] and det["detectors"][0]["init_args"]["mode"] == "data_limited"
        twin = yaml.safe_load((ADAPTIVE / "cifar10" / f"{name}.yaml").read_text())
        net = twin["model"]["init_args"]["net"]["init_args"]
        assert net["num_blocks"] == [2, 2, 2, 2] and net["width"] == 64 and twin["data"]["init_args"]["dataset"] == "cifar10"
