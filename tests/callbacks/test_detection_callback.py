"""DetectionCallback: documented keys, numbers against sklearn on the detectors' own scores, foreign modules."""

import json
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import f1_score, roc_auc_score
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_backdoor import BackdoorClassifier, BackdoorDataModule
from lightning_backdoor.attacks import BadNets
from lightning_backdoor.callbacks import BackdoorMetrics, DetectionCallback
from lightning_backdoor.detectors import IBDPSC, Detector, ScaleUp, Strip
from lightning_backdoor.wandb_utils import read_offline_run

METRICS = ("auroc", "f1", "tpr@fpr1", "tpr@fpr5")


def _dm(**kw):
    args = dict(attack=BadNets(), target=0, rate=0.1, val_size=100, defense_size=100, batch_size=64, eval_batch_size=50)
    args.update(kw)
    return BackdoorDataModule("mnist5k", **args)


def _trainer(callbacks, **kw):
    args = dict(max_epochs=1, limit_train_batches=4, enable_progress_bar=False, enable_model_summary=False,
                enable_checkpointing=False, logger=False, num_sanity_val_steps=0, accelerator="cpu")
    args.update(kw)
    return L.Trainer(callbacks=callbacks, **args)


def test_logs_documented_keys_for_each_detector(tiny_net):
    cb = DetectionCallback([ScaleUp(mode="data_limited"), IBDPSC(k=1), Strip(n=4)], max_samples=60, progress=False)
    trainer = _trainer([cb])
    trainer.fit(BackdoorClassifier(tiny_net), _dm())
    trainer.test(BackdoorClassifier(tiny_net), _dm())
    logged = trainer.callback_metrics
    for stage in ("test",):
        for det in ("scale_up", "ibd_psc", "strip"):
            assert f"{stage}/{det}/relative_cost" in logged
            for m in METRICS:
                assert f"{stage}/{det}/{m}" in logged, (stage, det, m, sorted(logged))
    assert float(logged["test/ibd_psc/k"]) == 1.0
    assert "val/scale_up/auroc" in cb.last_results or "test/scale_up/auroc" in cb.last_results


def test_metrics_equal_sklearn_on_the_detectors_scores(tiny_net):
    dm = _dm()
    trainer = _trainer([], limit_train_batches=6)
    module = BackdoorClassifier(tiny_net)
    trainer.fit(module, dm)
    det = Strip(n=4, threshold=-0.5)
    cb = DetectionCallback([det], stages=("test",), max_samples=80, progress=False, plots=False)
    # detector fitted and evaluated by the callback ...
    trainer2 = _trainer([cb])
    trainer2.test(module, dm)
    got = {k: float(v) for k, v in trainer2.callback_metrics.items() if k.startswith("test/strip/")}
    # ... and independently: refit the same way and score the same samples
    det_ref = Strip(n=4, threshold=-0.5)
    dm.setup()
    fit_x = torch.stack([dm.defense_set[i].x for i in range(100)])
    fit_y = torch.tensor([dm.defense_set[i].y for i in range(100)])
    det_ref.fit(tiny_net, (fit_x, fit_y))
    # the capped sets are seeded random samples of 80 (never the first 80)
    from lightning_backdoor.utils import random_subset

    pos_b, pos_p = random_subset(len(dm.test_clean), 80, seed=0), random_subset(len(dm.test_poisoned), 80, seed=0)
    assert pos_b.tolist() != list(range(80))
    xb = torch.stack([dm.test_clean[i].x for i in pos_b.tolist()])
    xp = torch.stack([dm.test_poisoned[i].x for i in pos_p.tolist()])
    # the callback seeds each sample's overlays by its set and position (rank/batch independent)
    from lightning_backdoor.callbacks._evaluation import sample_ids

    scores = torch.cat([det_ref.score(tiny_net, xb[i:i + 50], sample_ids=sample_ids(0, pos_b[i:i + 50]))
                        for i in range(0, 80, 50)]
                       + [det_ref.score(tiny_net, xp[i:i + 50], sample_ids=sample_ids(1, pos_p[i:i + 50]))
                          for i in range(0, 80, 50)]).numpy()
    labels = [0] * 80 + [1] * 80
    assert got["test/strip/auroc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-5)
    assert got["test/strip/f1"] == pytest.approx(f1_score(labels, scores > -0.5), abs=1e-5)


class HashNet(nn.Module):
    """Deterministic pseudo-random predictions from the pixels: some benign right, some poisoned on the target."""

    num_classes, in_channels = 10, 1

    def __init__(self):
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        cls = (x.double().mean(dim=(1, 2, 3)) * 1e5).long() % 10
        return F.one_hot(cls, 10).float() * 10 + self.dummy


class MeanPixel(Detector):
    """score = mean pixel; records every batch it scores."""

    name = "mean_pixel"

    def __init__(self):
        super().__init__(threshold=0.2)
        self.batches = []

    def score(self, model, x):
        self.batches.append(x.detach().clone())
        return x.double().mean(dim=(1, 2, 3))


def _eval_sets(dm, n, seed=0):
    from lightning_backdoor.utils import random_subset

    dm.setup()
    pos_b, pos_p = random_subset(len(dm.test_clean), n, seed), random_subset(len(dm.test_poisoned), n, seed)
    xb = torch.stack([dm.test_clean[i].x for i in pos_b.tolist()])
    yb = torch.tensor([dm.test_clean[i].y for i in pos_b.tolist()])
    xp = torch.stack([dm.test_poisoned[i].x for i in pos_p.tolist()])
    return xb, yb, xp, pos_b, pos_p


def test_successful_only_metrics_use_only_successful_samples():
    dm, net = _dm(), HashNet()
    cb = DetectionCallback([MeanPixel()], stages=("test",), max_samples=200, progress=False, plots=False)
    _trainer([cb]).test(BackdoorClassifier(net), dm)
    xb, yb, xp, _, _ = _eval_sets(dm, 200)
    sb, sp = xb.double().mean(dim=(1, 2, 3)), xp.double().mean(dim=(1, 2, 3))
    ok_b, ok_p = net(xb).argmax(1) == yb, net(xp).argmax(1) == 0
    assert 5 <= int(ok_b.sum()) < 200 and 5 <= int(ok_p.sum()) < 200  # a real subset on both sides
    labels_all = [0] * 200 + [1] * 200
    scores_all = torch.cat([sb, sp]).numpy()
    labels_ok = [0] * int(ok_b.sum()) + [1] * int(ok_p.sum())
    scores_ok = torch.cat([sb[ok_b], sp[ok_p]]).numpy()
    got = cb.last_results
    assert got["test/mean_pixel/auroc"] == pytest.approx(roc_auc_score(labels_all, scores_all), abs=1e-6)
    assert got["test/mean_pixel/successful/auroc"] == pytest.approx(roc_auc_score(labels_ok, scores_ok), abs=1e-6)
    assert got["test/mean_pixel/successful/f1"] == pytest.approx(f1_score(labels_ok, scores_ok > 0.2), abs=1e-6)
    assert got["test/mean_pixel/successful/auroc"] != pytest.approx(got["test/mean_pixel/auroc"], abs=1e-3)


def test_works_in_a_foreign_lightning_module_with_user_loaders():
    torch.manual_seed(0)

    class Foreign(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                                      nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))

        def forward(self, x):
            return self.body(x)

        def training_step(self, batch, i):
            x, y = batch
            return F.cross_entropy(self(x), y)

        def validation_step(self, batch, i):
            x, y = batch
            self.log("val_loss", F.cross_entropy(self(x), y))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    x = torch.rand(64, 1, 8, 8)
    y = torch.randint(0, 3, (64,))
    xp = x.clone()
    xp[..., -2:, -2:] = 1.0
    clean = DataLoader(TensorDataset(x, y), batch_size=16)
    poisoned = DataLoader(TensorDataset(xp, y), batch_size=16)  # (x, y) poisoned batches carry the TRUE label
    cb = DetectionCallback([ScaleUp(), Strip(n=3)], benign_loader=clean, poisoned_loader=poisoned,
                           fit_loader=clean, target=0, progress=False)
    bm = BackdoorMetrics(clean_loader=clean, poisoned_loader=poisoned, target=0)
    trainer = _trainer([cb, bm])
    trainer.fit(Foreign(), clean, clean)
    m = trainer.callback_metrics
    assert "val/scale_up/auroc" in m and "val/strip/f1" in m
    assert 0.0 <= float(m["val/ba"]) <= 1.0 and 0.0 <= float(m["val/asr"]) <= 1.0


def test_no_poisoned_samples_warns_and_does_not_crash(tiny_net):
    x = torch.rand(32, 1, 28, 28)
    y = torch.randint(0, 10, (32,))
    clean = DataLoader(TensorDataset(x, y), batch_size=16)
    cb = DetectionCallback([ScaleUp()], stages=("test",), benign_loader=clean, progress=False)
    trainer = _trainer([cb])
    with pytest.warns(UserWarning, match="no poisoned loader"):
        trainer.test(BackdoorClassifier(tiny_net), clean)
    assert "test/scale_up/auroc" not in trainer.callback_metrics


def test_ibd_psc_without_k_above_xi_is_skipped_with_the_reason(tiny_net):
    cb = DetectionCallback([IBDPSC(xi=1.0)], stages=("test",), max_samples=20, progress=False)
    trainer = _trainer([cb])
    with pytest.warns(UserWarning, match="could not be fitted"):
        trainer.test(BackdoorClassifier(tiny_net), _dm())


@pytest.mark.parametrize("kwargs, match", [
    ({"detectors": []}, "detectors"),
    ({"detectors": ["scale_up"]}, "Detector"),
    ({"stages": ("train",)}, "stages"),
    ({"every_n_epochs": 0}, "every_n_epochs"),
    ({"max_samples": 0}, "max_samples"),
    ({"noise_magnitude": 0}, "noise_magnitude"),
])
def test_bad_arguments(kwargs, match):
    args = {"detectors": [ScaleUp()]}
    args.update(kwargs)
    with pytest.raises((ValueError, TypeError), match=match):
        DetectionCallback(**args)


def test_noise_copies_double_the_samples_and_keep_rank_independent_noise():
    dm, net, det = _dm(), HashNet(), MeanPixel()
    cb = DetectionCallback([det], stages=("test",), max_samples=30, noise_copies=True, noise_magnitude=0.05, seed=3,
                           progress=False, plots=False)
    _trainer([cb]).test(BackdoorClassifier(net), dm)
    scored = torch.cat(det.batches)
    assert len(scored) == 2 * (30 + 30)  # every benign and poisoned sample, plus its noisy copy
    assert cb.last_num_scored == {"benign": 30, "poisoned": 30}
    from lightning_backdoor.callbacks._evaluation import per_sample_noise

    xb, _, xp, pos_b, pos_p = _eval_sets(dm, 30, seed=3)  # the callback's seed draws its capped subsets
    # eval batch 50 > 30: one batch per set, the clean batch then its noisy copy (noise seeded by set and position)
    noisy_b, noisy_p = per_sample_noise(xb, pos_b, 0.05, 3 * 2 + 0), per_sample_noise(xp, pos_p, 0.05, 3 * 2 + 1)
    torch.testing.assert_close(scored, torch.cat([xb, noisy_b, xp, noisy_p]))
    assert float((noisy_b - xb).abs().max()) > 0.01
    labels = [0] * 60 + [1] * 60
    ref = torch.cat([xb, noisy_b, xp, noisy_p]).double().mean(dim=(1, 2, 3)).numpy()
    assert cb.last_results["test/mean_pixel/auroc"] == pytest.approx(roc_auc_score(labels, ref), abs=1e-6)
    # the noisy copy of a sample does not depend on the batch it lands in
    x = torch.rand(4, 1, 5, 5)
    a = per_sample_noise(x, torch.tensor([0, 1, 2, 3]), 0.05, 0)
    b = per_sample_noise(x[2:], torch.tensor([2, 3]), 0.05, 0)
    assert torch.equal(a[2:], b)
    assert float((a - x).abs().max()) > 0 and float(a.min()) >= 0 and float(a.max()) <= 1


def test_wandb_offline_run_records_detector_metrics(tiny_net, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "offline")
    from lightning.pytorch.loggers import WandbLogger

    logger = WandbLogger(project="lb-test", save_dir=str(tmp_path), offline=True)
    cb = DetectionCallback([ScaleUp(), Strip(n=3)], stages=("test",), max_samples=40, progress=False, sample_table=25)
    trainer = _trainer([cb], logger=logger)
    trainer.test(BackdoorClassifier(tiny_net), _dm())
    expected = {k: float(v) for k, v in trainer.callback_metrics.items()}
    run_dir = Path(logger.experiment.dir).parent
    logger.experiment.finish()
    summary = read_offline_run(run_dir, wait=30)["summary"]
    for key in ("test/scale_up/auroc", "test/strip/f1", "test/ba", "test/asr"):
        assert summary[key] == pytest.approx(expected[key], abs=1e-6)
    for key in ("test/scale_up/roc", "test/strip/scores"):  # plots logged as images
        assert summary[f"{key}/_type"].startswith("images")
        assert (run_dir / "files" / summary[f"{key}/filenames"][0]).is_file()
    # W&B-native charts: ROC as a table behind wandb.plot.line, histograms of both classes
    for det in ("scale_up", "strip"):
        assert summary[f"test/{det}/roc_curve_table/_type"] == "table-file"
        roc = json.loads((run_dir / "files" / summary[f"test/{det}/roc_curve_table/path"]).read_text())
        assert roc["columns"] == ["fpr", "tpr"] and roc["data"][0] == [0.0, 0.0] and roc["data"][-1] == [1.0, 1.0]
        for part in ("benign", "poisoned"):
            assert sum(summary[f"test/{det}/scores_{part}/values"]) == 40  # every scored input once
    table = json.loads((run_dir / "files" / summary["test/detection_samples/path"]).read_text())
    assert table["columns"] == ["set", "position", "noisy", "label", "pred", "scale_up_score", "strip_score"]
    assert len(table["data"]) == 25 and {r[0] for r in table["data"]} <= {"benign", "poisoned"}
