"""``BackdoorDataModule(sanitizer=...)``: removes exactly the flagged samples, logs removal metrics that match
sklearn, and resume / ``from_checkpoint`` keep the same removed set."""

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import Logger

from tiny_net import TinyResNet
from lightning_backdoor import BackdoorClassifier, BackdoorDataModule
from lightning_backdoor.attacks import BadNets
from lightning_backdoor.checkpoints import safe_load
from lightning_backdoor.data import CheckpointMismatchError
from lightning_backdoor.sanitizers import ModelFeatures, Slab, Sphere

SIZES = dict(val_size=100, defense_size=100, test_size=200, batch_size=64, eval_batch_size=500)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def make_dm(sanitizer=None, **kw):
    return BackdoorDataModule("mnist5k", attack=BadNets(), target=0, rate=0.1, seed=0, sanitizer=sanitizer,
                              **{**SIZES, **kw})


def stacked(ds):
    """Features (pixels), labels and positions of every sample of ``ds``, read one by one without augmentation."""
    ds.transform = None
    items = [ds[i] for i in range(len(ds))]
    return (torch.stack([s.x.flatten() for s in items]), torch.tensor([int(s.y) for s in items]),
            torch.tensor([int(s.index) for s in items]))


@pytest.fixture(scope="module")
def reference():
    ref = make_dm()
    ref.setup()
    return ref, stacked(ref.train_set), stacked(ref.defense_set)


@pytest.mark.parametrize("make", [lambda: Sphere(), lambda: Slab(mode="data", percentile=90)], ids=["sphere-oracle", "slab-data"])
def test_removes_exactly_the_flagged_samples(reference, make):
    ref, (x, y, index), (cx, cy, _) = reference
    san = make()
    dm = make_dm(san)
    dm.setup()
    direct = make()  # the same sanitiser fitted by hand on the same features
    direct.fit(cx, cy, 10) if direct.mode == "oracle" else direct.fit(x, y, 10)
    flagged = ~direct.keep(x, y)
    assert 0 < int(flagged.sum()) < len(x)
    assert torch.equal(dm.sanitization.removed, torch.sort(index[flagged]).values)
    assert len(dm.train_set) == len(ref.train_set) - int(flagged.sum())
    seen = torch.cat([b.index for b in dm.train_dataloader()])
    assert torch.equal(torch.sort(seen).values, torch.sort(index[~flagged]).values)
    assert dm.backdoor_info()["sanitizer"]["removed"] == int(flagged.sum())
    assert torch.equal(dm.train_set.poison_indices, ref.train_set.poison_indices)


def test_features_are_computed_without_augmentation():
    from lightning_backdoor.data import PoisonedDataset
    from lightning_backdoor.data.datasets import TensorImageDataset
    from lightning_backdoor.data.sanitize import sanitize_training_set

    g = torch.Generator().manual_seed(0)
    base = TensorImageDataset(torch.rand(40, 1, 8, 8, generator=g), torch.arange(40) % 2)
    augment = lambda im: torch.rand_like(im)  # noqa: E731 - an augmentation that would change every feature
    ds = PoisonedDataset(base, BadNets(patch_size=2), target=0, num_classes=2, rate=0.1, transform=augment)
    ds.attack.build(1, 8, 8)
    result = sanitize_training_set(ds, Sphere(mode="data"), None, 2, poisoned_known=True)
    assert ds.transform is augment  # back on for training
    x = torch.stack([(ds.attack(base[i][0]) if ds._poison_mask[i] else base[i][0]).flatten() for i in range(40)])
    y = torch.tensor([0 if ds._poison_mask[i] else i % 2 for i in range(40)])
    assert torch.allclose(result.scores, Sphere(mode="data").fit(x, y).score(x, y))
    assert len(ds) == 40 - len(result.removed)


def test_model_feature_space(reference):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.AvgPool2d(4), torch.nn.Flatten(), torch.nn.Linear(49, 8), torch.nn.ReLU(),
                              torch.nn.Linear(8, 10))
    dm = make_dm(Sphere(mode="data", features=ModelFeatures(net)))
    dm.setup()
    _, (x, y, index), _ = reference
    feats = ModelFeatures(net)(x.view(-1, 1, 28, 28))
    assert feats.shape == (len(x), 8)  # the 8 inputs of the head
    direct = Sphere(mode="data").fit(feats, y, 10)
    assert torch.equal(dm.sanitization.removed, torch.sort(index[~direct.keep(feats, y)]).values)


class Captured(Logger):
    def __init__(self):
        super().__init__()
        self.metrics, self.hparams = {}, {}

    @property
    def name(self):
        return "captured"

    @property
    def version(self):
        return 0

    def log_metrics(self, metrics, step=None):
        self.metrics.update(metrics)

    def log_hyperparams(self, params, *args, **kwargs):
        self.hparams.update(params)


def fit(dm, tmp_path, ckpt_path=None, max_epochs=1, logger=False):
    torch.manual_seed(0)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=max_epochs, limit_train_batches=1, limit_val_batches=0,
                        num_sanity_val_steps=0, logger=logger, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)],
                        default_root_dir=str(tmp_path))
    trainer.fit(BackdoorClassifier(TinyResNet()), dm, ckpt_path=ckpt_path)
    return trainer


def test_logged_removal_metrics_match_sklearn(tmp_path):
    from sklearn.metrics import precision_score, recall_score, roc_auc_score

    dm = make_dm(Sphere())
    logger = Captured()
    fit(dm, tmp_path, logger=logger)
    n = len(dm.sanitization.scores)
    removed = torch.isin(torch.arange(n), dm.sanitization.removed).numpy()
    poisoned = torch.isin(torch.arange(n), dm.train_set.poison_indices).numpy()
    got = {k: v for k, v in logger.metrics.items() if k.startswith("train/sanitiser/")}
    assert set(got) == {f"train/sanitiser/{k}" for k in ("precision", "recall", "auroc", "removed", "clean_removed")}
    assert got["train/sanitiser/precision"] == pytest.approx(precision_score(poisoned, removed))
    assert got["train/sanitiser/recall"] == pytest.approx(recall_score(poisoned, removed))
    assert got["train/sanitiser/auroc"] == pytest.approx(roc_auc_score(poisoned, dm.sanitization.scores.numpy()))
    assert got["train/sanitiser/removed"] == removed.sum()
    assert got["train/sanitiser/clean_removed"] == (removed & ~poisoned).sum()
    assert logger.hparams["backdoor"]["sanitizer"]["name"] == "sphere"


@pytest.fixture(scope="module")
def sanitised_checkpoint(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sanitised")
    dm = make_dm(Sphere())
    fit(dm, tmp)
    return tmp / "ckpt" / "last.ckpt", dm.sanitization.removed.clone(), len(dm.train_set)


def test_checkpoint_records_and_from_checkpoint_restores_the_removed_set(sanitised_checkpoint):
    path, removed, n_train = sanitised_checkpoint
    state = safe_load(path)["BackdoorDataModule"]  # loads with weights_only=True
    assert torch.equal(state["sanitizer_removed"], removed) and state["sanitizer_name"] == "sphere"
    rebuilt = BackdoorDataModule.from_checkpoint(path)
    assert rebuilt.sanitizer is None and torch.equal(rebuilt.sanitization.removed, removed)
    assert len(rebuilt.train_set) == n_train
    assert not bool(torch.isin(rebuilt.train_set.indices, removed).any())
    assert rebuilt.sanitizer_metrics()["train/sanitiser/removed"] == len(removed)
    # recomputing with the run's sanitiser verifies the recorded set
    again = BackdoorDataModule.from_checkpoint(path, sanitizer=Sphere())
    assert torch.equal(again.sanitization.removed, removed)


def test_resume_keeps_the_removed_set(sanitised_checkpoint, tmp_path):
    path, removed, _ = sanitised_checkpoint
    dm = make_dm(Sphere())
    trainer = fit(dm, tmp_path, ckpt_path=str(path), max_epochs=2)
    assert trainer.global_step == 2 and torch.equal(dm.sanitization.removed, removed)


def test_other_sanitisation_than_the_checkpoints_is_refused(sanitised_checkpoint):
    path, _, _ = sanitised_checkpoint
    state = safe_load(path)["BackdoorDataModule"]
    other = make_dm(Sphere(percentile=90))
    other.setup()
    with pytest.raises(CheckpointMismatchError, match="removed by the sanitiser 'sphere' now .* differ"):
        other.load_state_dict(state)
    plain = make_dm()
    plain.setup()
    with pytest.raises(CheckpointMismatchError, match="sanitised training set .* has no sanitizer"):
        plain.load_state_dict(state)
    unsanitised = {k: v for k, v in state.items() if not k.startswith("sanitizer_")}
    with pytest.raises(CheckpointMismatchError, match="trained without a sanitiser"):
        other.load_state_dict(unsanitised)
