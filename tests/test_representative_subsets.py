"""Capped and held-apart subsets hold every class, on a dataset stored class by class (issue 8).

ImageFolder (Imagenette, Tiny-ImageNet) and GTSRB list their samples class by class. Taking "the first N"
of such a set gives one or two classes; every capped subset must be a seeded random sample and the
defence split stratified by class.
"""

import lightning as L
import pytest
import torch

from data.test_datasets import write_imagefolder
from lightning_backdoor import BackdoorClassifier, BackdoorDataModule
from lightning_backdoor.attacks import BadNets
from lightning_backdoor.callbacks import BackdoorMetrics, DetectionCallback
from lightning_backdoor.data import stratified_split
from lightning_backdoor.detectors import Detector, collect_benign
from lightning_backdoor.models import create_model

CLASSES = tuple(f"c{i}" for i in range(6))


class Recorder(Detector):
    """Records which labels it was fitted on and which inputs it scored (score = mean pixel)."""

    name = "recorder"
    requires_fit = True

    def __init__(self):
        super().__init__(threshold=0.5)
        self.fit_labels, self.scored = None, []

    def fit(self, model, benign):
        _, self.fit_labels = collect_benign(benign, max_samples=None)
        self.fitted = True
        return self

    def score(self, model, x):
        self.scored.append(x.detach().cpu())
        return x.flatten(1).mean(1).double()


@pytest.fixture(scope="module")
def sorted_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("sorted_imagefolder")
    write_imagefolder(root, classes=CLASSES, per_class=20, size=(12, 12))
    return root


def make_dm(root, **kw):
    args = dict(attack=BadNets(patch_size=2), target=0, rate=0.05, image_size=(12, 12), val_size=12, defense_size=30,
                batch_size=16, eval_batch_size=8)
    args.update(kw)
    return BackdoorDataModule("imagefolder", root=str(root), **args)


def test_the_folder_is_stored_class_by_class(sorted_folder):
    dm = make_dm(sorted_folder)
    dm.setup()
    labels = torch.tensor([dm.test_clean[i].y for i in range(len(dm.test_clean))])
    assert torch.equal(labels, torch.sort(labels).values)  # the premise of these tests


def test_defence_and_validation_splits_are_stratified(sorted_folder):
    dm = make_dm(sorted_folder)
    dm.setup()
    defence = torch.bincount(torch.tensor([s.y for s in dm.defense_set]), minlength=6)
    val = torch.bincount(torch.tensor([s.y for s in dm.val_clean]), minlength=6)
    assert defence.tolist() == [5] * 6  # 30 held apart from 120 training images: 5 of each class
    assert val.tolist() == [2] * 6


def test_stratified_split_quotas_and_determinism():
    labels = torch.tensor([0] * 50 + [1] * 30 + [2] * 20)
    a, b, rest = stratified_split(labels, [10, 20], seed=3)
    assert torch.bincount(labels[a], minlength=3).tolist() == [5, 3, 2]
    assert torch.bincount(labels[b], minlength=3).tolist() == [10, 6, 4]
    assert len(rest) == 70 and not set(a.tolist()) & set(b.tolist()) and not set(rest.tolist()) & set(a.tolist())
    again = stratified_split(labels, [10, 20], seed=3)
    assert all(torch.equal(x, y) for x, y in zip((a, b, rest), again))
    assert not torch.equal(stratified_split(labels, [10, 20], seed=4)[0], a)


def test_capped_detection_and_fitting_sets_hold_every_class(sorted_folder):
    dm = make_dm(sorted_folder)
    torch.manual_seed(0)
    net = create_model("small_cnn", num_classes=6, in_channels=3)
    det = Recorder()
    cb = DetectionCallback([det], stages=("test",), max_samples=12, fit_samples=12, progress=False, plots=False)
    trainer = L.Trainer(max_epochs=1, limit_train_batches=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[cb])
    trainer.test(BackdoorClassifier(net), dm)
    # the 12 fitting samples from a 30-sample, class-stratified defence split: a random sample, not the first 12
    assert len(det.fit_labels) == 12 and len(set(det.fit_labels.tolist())) >= 4
    # the 12 benign images scored are a seeded random sample of the 60 test images (10 per class)
    scored_benign = torch.cat(det.scored[: len(det.scored) // 2])
    test_x = torch.stack([s.x for s in dm.test_clean])
    test_y = torch.tensor([s.y for s in dm.test_clean])
    rows = [int(((test_x - img).abs().flatten(1).sum(1) == 0).nonzero()[0]) for img in scored_benign]
    assert len(rows) == 12 and len(set(test_y[rows].tolist())) >= 4


def test_backdoor_metrics_cap_is_a_random_sample(sorted_folder):
    dm = make_dm(sorted_folder)
    torch.manual_seed(0)

    class Oracle(L.LightningModule):
        """Predicts class 0 for every input: BA on a capped set = share of class 0 in it."""

        def forward(self, x):
            out = torch.zeros(len(x), 6, device=x.device)
            out[:, 0] = 1
            return out

        def test_step(self, batch, batch_idx, dataloader_idx=0):
            return None

    module = Oracle()
    bm = BackdoorMetrics(stages="test", max_samples=30)
    trainer = L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[bm])
    trainer.test(module, dm)
    # "the first 30" of the class-sorted test set would be classes 0-2 (BA 1/3 exactly); a random sample is not
    assert 0 < bm.last_results["test/ba"] < 0.3
