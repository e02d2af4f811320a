"""Exact resume: a fit stopped between epochs or mid-epoch and resumed from its last checkpoint ends
exactly like an uninterrupted one (weights, metrics, poisoned indices, trigger, detector state, step).

WaNet is used because its cover ("noise mode") samples draw from the global RNG while loading, so
the data module's RNG restore is exercised too.
"""

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from tiny_net import TinyResNet
from lightning_backdoor import BackdoorClassifier, BackdoorDataModule
from lightning_backdoor.attacks import WaNet
from lightning_backdoor.callbacks import DetectionCallback
from lightning_backdoor.checkpoints import safe_load
from lightning_backdoor.data import CheckpointMismatchError, poisoned_test_set_from_checkpoint
from lightning_backdoor.detectors import IBDPSC, ScaleUp, Strip

BATCHES = 4  # training batches per epoch


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny convolutions on a busy 2-core machine run faster (and as exactly) on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class Killed(Exception):
    pass


class Crash(L.Callback):
    """Simulates a killed job: raises before training step ``at`` (the checkpoint of step ``at`` exists)."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.at:
            raise Killed(f"stopped before step {self.at}")


class Restored(L.Callback):
    """Records the detection callback's state right after Lightning restored it, before training resumes."""

    def __init__(self, detection) -> None:
        self.detection, self.state = detection, None

    def on_train_start(self, trainer, pl_module):
        self.state = self.detection.state_dict()


def setup_run(tmp_path, seed=0):
    L.seed_everything(seed, workers=True)
    dm = BackdoorDataModule("mnist5k", attack=WaNet(k=4, s=0.5, cross_ratio=2.0), target=0, rate=0.1, seed=seed,
                            val_size=60, defense_size=60, test_size=60, batch_size=32, eval_batch_size=60)
    module = BackdoorClassifier(TinyResNet(), optimizer=lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9),
                                scheduler=lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=1, gamma=0.5))
    detection = DetectionCallback([ScaleUp(mode="data_limited"), IBDPSC(), Strip(n=2, pool_size=16)],
                                  stages=("validate",),
                                  max_samples=16, fit_samples=32, progress=False, plots=False)
    return dm, module, detection


def trainer(tmp_path, callbacks, **kw):
    args = dict(max_epochs=2, limit_train_batches=BATCHES, accelerator="cpu", devices=1, deterministic=True,
                logger=False, enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                default_root_dir=str(tmp_path))
    args.update(kw)
    return L.Trainer(callbacks=callbacks, **args)


def finished(t, dm, module, detection):
    return {
        "weights": {k: v.clone() for k, v in module.state_dict().items()},
        "global_step": t.global_step,
        "logged_steps": t.fit_loop.epoch_loop._batches_that_stepped,
        "epoch": t.current_epoch,
        "metrics": {k: float(v) for k, v in t.callback_metrics.items() if not k.endswith("relative_cost")},
        "poison": dm.train_set.poison_indices.clone(),
        "cover": dm.train_set.cover_indices.clone(),
        "noise": dm.attack.noise.clone(),
        "detection": detection.state_dict(),
    }


def assert_same_state(a, b, path="state"):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), path
    elif isinstance(a, dict):
        assert set(a) == set(b), path
        for k in a:
            assert_same_state(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_state(x, y, f"{path}[{i}]")
    else:
        assert a == b, (path, a, b)


def assert_same_run(resumed, reference, mid_epoch=False):
    for k, v in reference["weights"].items():
        assert torch.equal(resumed["weights"][k], v), f"weight {k} differs after resume"
    for key in ("global_step", "logged_steps", "epoch"):
        assert resumed[key] == reference[key], key
    # Lightning does not checkpoint its running epoch averages, so after a mid-epoch resume the
    # epoch-level train/* logs average the batches since the resume only (a Lightning limitation)
    skip = ("train/",) if mid_epoch else ()
    kept = {k: v for k, v in reference["metrics"].items() if not k.startswith(skip or "\0")}
    assert {k: resumed["metrics"][k] for k in kept} == kept
    assert any(k.startswith("val/") for k in kept)
    for key in ("poison", "cover", "noise"):
        assert torch.equal(resumed[key], reference[key]), key
    assert_same_state(resumed["detection"], reference["detection"], "detection")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("uninterrupted")
    dm, module, detection = setup_run(tmp)
    t = trainer(tmp, [detection], enable_checkpointing=False)
    t.fit(module, dm)
    out = finished(t, dm, module, detection)
    assert out["global_step"] == 2 * BATCHES and "val/scale_up/auroc" in out["metrics"]
    assert len(out["cover"]) > 0  # WaNet noise-mode samples are in play
    return out


def _resume(tmp_path, ckpt_path):
    dm, module, detection = setup_run(tmp_path, seed=0)
    restored = Restored(detection)
    L.seed_everything(123)  # a different global RNG state: the checkpoint must restore what matters
    t = trainer(tmp_path, [detection, restored, ModelCheckpoint(dirpath=tmp_path / "resumed")])
    t.fit(module, dm, ckpt_path=ckpt_path)
    return finished(t, dm, module, detection), restored.state


def test_resume_between_epochs_matches_uninterrupted(reference, tmp_path):
    dm, module, detection = setup_run(tmp_path)
    ckpt_cb = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    t = trainer(tmp_path, [detection, ckpt_cb], max_epochs=1)
    t.fit(module, dm)
    last = tmp_path / "ckpt" / "last.ckpt"
    saved_detection = safe_load(last)["callbacks"][detection.state_key]
    resumed, restored = _resume(tmp_path, str(last))
    assert_same_run(resumed, reference)
    assert_same_state(restored, saved_detection, "restored detection state")
    assert restored["detectors"]["ibd_psc"]["k"] is not None and restored["detectors"]["scale_up"]["fitted"]


def test_resume_mid_epoch_matches_uninterrupted(reference, tmp_path):
    stop = BATCHES + BATCHES // 2  # in the middle of the second epoch
    dm, module, detection = setup_run(tmp_path)
    ckpt_cb = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, every_n_train_steps=stop)
    t = trainer(tmp_path, [detection, Crash(stop), ckpt_cb])
    with pytest.raises(Killed):
        t.fit(module, dm)
    assert t.global_step == stop
    last = tmp_path / "ckpt" / "last.ckpt"
    ckpt = safe_load(last)
    assert ckpt["global_step"] == stop
    assert ckpt["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]["batches"] == BATCHES // 2
    resumed, restored = _resume(tmp_path, str(last))
    assert_same_run(resumed, reference, mid_epoch=True)
    assert_same_state(restored, ckpt["callbacks"][detection.state_key], "restored detection state")


def test_checkpoint_rebuilds_poisoned_test_set_alone(reference, tmp_path):
    dm, module, detection = setup_run(tmp_path)
    t = trainer(tmp_path, [ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)], max_epochs=1,
                limit_train_batches=1, limit_val_batches=0)
    t.fit(module, dm)
    path = tmp_path / "ckpt" / "last.ckpt"
    rebuilt = BackdoorDataModule.from_checkpoint(path)
    assert isinstance(rebuilt.attack, WaNet) and rebuilt.attack is not dm.attack
    assert torch.equal(rebuilt.attack.noise, dm.attack.noise)
    assert torch.equal(rebuilt.train_set.poison_indices, dm.train_set.poison_indices)
    test_set = poisoned_test_set_from_checkpoint(path)
    assert len(test_set) == len(dm.test_poisoned)
    for i in (0, len(test_set) - 1):
        assert torch.equal(test_set[i].x, dm.test_poisoned[i].x) and test_set[i].index == dm.test_poisoned[i].index


def test_checkpoint_of_other_data_is_refused(tmp_path):
    dm, module, _ = setup_run(tmp_path)
    t = trainer(tmp_path, [ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)], max_epochs=1,
                limit_train_batches=1, limit_val_batches=0)
    t.fit(module, dm)
    state = safe_load(tmp_path / "ckpt" / "last.ckpt")["BackdoorDataModule"]
    other = BackdoorDataModule("mnist5k", attack=WaNet(), seed=1, val_size=60, defense_size=60, test_size=60)
    with pytest.raises(CheckpointMismatchError, match="seed: checkpoint 0 vs this data module 1"):
        other.load_state_dict(state)
    tampered = dict(state, poison_indices=state["poison_indices"] + 1)
    same = BackdoorDataModule("mnist5k", attack=WaNet(), seed=0, val_size=60, defense_size=60, test_size=60)
    same.setup()
    with pytest.raises(CheckpointMismatchError, match="poison indices rebuilt from the data .* differ"):
        same.load_state_dict(tampered)
