"""BackdoorClassifier: training with poisoned data, BA/ASR against a direct re-computation."""

from typing import Any, Dict, List

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers.logger import Logger, rank_zero_experiment
from torch import nn

from lightning_backdoor import BackdoorClassifier, BackdoorDataModule
from lightning_backdoor.attacks import BadNets
from lightning_backdoor.metrics import AttackSuccessRate, BenignAccuracy, attack_success_rate, benign_accuracy


class RecordingLogger(Logger):
    """Keeps every logged metric and hyper-parameter in memory."""

    def __init__(self) -> None:
        super().__init__()
        self.metrics: List[Dict[str, float]] = []
        self.hparams: Dict[str, Any] = {}

    @property
    def name(self) -> str:
        return "recording"

    @property
    def version(self) -> int:
        return 0

    @property
    @rank_zero_experiment
    def experiment(self):
        return None

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        self.hparams.update(params if isinstance(params, dict) else vars(params))

    def log_metrics(self, metrics, step=None) -> None:
        self.metrics.append(dict(metrics))

    def keys(self):
        return {k for m in self.metrics for k in m}


def _trainer(**kw):
    args = dict(max_epochs=1, limit_train_batches=3, enable_progress_bar=False, enable_model_summary=False,
                enable_checkpointing=False, logger=False, num_sanity_val_steps=0, accelerator="cpu")
    args.update(kw)
    return L.Trainer(**args)


def _predict(net, ds):
    xs = torch.stack([ds[i].x for i in range(len(ds))])
    net.eval()
    with torch.no_grad():
        return net(xs).argmax(1)


def test_ba_asr_equal_direct_recomputation(tiny_net):
    dm = BackdoorDataModule("mnist5k", attack=BadNets(), target=0, rate=0.1, val_size=200, batch_size=64,
                            eval_batch_size=50)
    module = BackdoorClassifier(tiny_net, optimizer=lambda p: torch.optim.SGD(p, lr=0.05))
    trainer = _trainer()
    trainer.fit(module, dm)
    dm.setup()
    preds_clean = _predict(tiny_net, dm.val_clean)
    labels = torch.tensor([dm.val_clean[i].y for i in range(len(dm.val_clean))])
    expected_ba = (preds_clean == labels).float().mean()
    preds_poison = _predict(tiny_net, dm.val_poisoned)
    orig = torch.tensor([dm.val_poisoned[i].original_y for i in range(len(dm.val_poisoned))])
    assert bool((orig != 0).all())
    expected_asr = (preds_poison == 0).float().mean()
    got = trainer.callback_metrics
    assert float(got["val/ba"]) == pytest.approx(float(expected_ba), abs=1e-6)
    assert float(got["val/asr"]) == pytest.approx(float(expected_asr), abs=1e-6)


def test_logs_documented_keys_and_backdoor_info(tiny_net):
    dm = BackdoorDataModule("mnist5k", attack=BadNets(), target=3, rate=0.05, val_size=100, batch_size=64)
    logger = RecordingLogger()
    module = BackdoorClassifier(tiny_net, noise_sigmas=(0.1, 0.3))
    trainer = _trainer(logger=logger, log_every_n_steps=1)
    trainer.fit(module, dm)
    trainer.test(module, dm)
    keys = logger.keys()
    for key in ["train/loss_step", "val/ba", "val/asr", "val/asr@noise0.1", "val/asr@noise0.3", "test/ba",
                "test/asr", "test/asr@noise0.1"]:
        assert key in keys, (key, sorted(keys))
    info = logger.hparams["backdoor"]
    assert info["attack"] == "badnets" and info["target"] == 3 and info["poison_rate"] == 0.05
    assert info["poison_fingerprint"] == dm.train_set.fingerprint
    assert info["num_poisoned"] == len(dm.train_set.poison_indices)


def test_metric_classes_match_functions():
    torch.manual_seed(0)
    logits = torch.randn(50, 4)
    labels = torch.randint(0, 4, (50,))
    ba = BenignAccuracy()
    asr = AttackSuccessRate(target=2)
    for chunk in range(0, 50, 7):
        ba.update(logits[chunk:chunk + 7], labels[chunk:chunk + 7])
        asr.update(logits[chunk:chunk + 7], labels[chunk:chunk + 7])
    preds = logits.argmax(1)
    assert float(ba.compute()) == pytest.approx(float((preds == labels).float().mean()))
    keep = labels != 2
    assert float(asr.compute()) == pytest.approx(float((preds[keep] == 2).float().mean()))
    assert float(benign_accuracy(logits, labels)) == pytest.approx(float(ba.compute()))
    assert float(attack_success_rate(logits, 2, labels)) == pytest.approx(float(asr.compute()))


def test_mismatched_num_classes_is_a_clear_error(tiny_net_cls):
    dm = BackdoorDataModule("mnist5k", attack=BadNets(), val_size=50)
    module = BackdoorClassifier(tiny_net_cls(num_classes=7))
    with pytest.raises(ValueError, match="num_classes"):
        _trainer().fit(module, dm)


def test_wrong_net_type():
    with pytest.raises(TypeError, match="net"):
        BackdoorClassifier("resnet18")
    with pytest.raises(ValueError, match="noise_sigmas"):
        BackdoorClassifier(nn.Linear(2, 2), noise_sigmas=(0.0,))


class ConstantTerm(nn.Module):
    """A loss term adding a fixed value and halving the vanilla loss, to check how terms combine."""

    name = "constant"
    main_weight = 0.5

    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, model, x, y, poisoned, original_y, target, logits=None):
        self.calls += 1
        assert poisoned.dtype == torch.bool and original_y.shape == y.shape and target == 0
        return torch.tensor(1.25)


def test_loss_terms_combine_and_are_logged(tiny_net):
    dm = BackdoorDataModule("mnist5k", attack=BadNets(), target=0, val_size=50, batch_size=32)
    term = ConstantTerm()
    logger = RecordingLogger()
    module = BackdoorClassifier(tiny_net, losses=[term])
    trainer = _trainer(logger=logger, log_every_n_steps=1, limit_train_batches=2, limit_val_batches=0)
    trainer.fit(module, dm)
    assert term.calls == 2
    step_logs = [m for m in logger.metrics if "train/loss_step" in m]
    for m in step_logs:
        assert m["train/loss_step"] == pytest.approx(0.5 * m["train/loss/bd_step"] + 1.25, rel=1e-5)
        assert m["train/loss/constant_step"] == pytest.approx(1.25)


def test_a_diverging_loss_stops_training_with_a_clear_error(tiny_net):
    """Never keep training on NaN weights: a non-finite loss raises, naming the step and what to do."""
    import lightning as L

    from lightning_backdoor import BackdoorClassifier, BackdoorDataModule
    from lightning_backdoor.attacks import BadNets
    from lightning_backdoor.losses import LossTerm

    class Exploding(LossTerm):
        name = "exploding"

        def forward(self, model, x, y, poisoned, original_y, target=None, logits=None):
            return logits.sum() * float("inf")

    trainer = L.Trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=0, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    with pytest.raises(FloatingPointError, match=r"training diverged.*global step 0.*gradient_clip_val"):
        trainer.fit(BackdoorClassifier(tiny_net, losses=[Exploding()]), BackdoorDataModule("mnist5k", attack=BadNets()))
