"""``BackdoorDataModule`` on the embedded MNIST-5k: splits, loaders, metadata and state."""

import pytest
import torch

from lightning_backdoor.attacks import BadNets
from lightning_backdoor.data import BackdoorDataModule, PoisonedDataset, Sample

TARGET = 0


def subset_indices(ds) -> set:
    """Indices into the full training split behind a Clean/PoisonedDataset built on a ``Subset``."""
    return set(ds.dataset.indices)


@pytest.fixture(scope="module")
def dm():
    dm = BackdoorDataModule("mnist5k", attack=BadNets(), target=TARGET, rate=0.1, seed=0,
                            val_size=500, defense_size=200, test_size=1000, batch_size=64, eval_batch_size=250)
    dm.setup("fit")
    return dm


def test_split_sizes_and_disjoint(dm):
    # mnist5k: 5,000 digits -> 1,000 test, 4,000 training split -> 500 val, 200 defence, 3,300 train
    assert len(dm.test_clean) == 1000
    assert (len(dm.train_set), len(dm.val_clean), len(dm.defense_set)) == (3300, 500, 200)
    train, val, defense = subset_indices(dm.train_set), subset_indices(dm.val_clean), subset_indices(dm.defense_set)
    assert len(train) == 3300 and len(val) == 500 and len(defense) == 200
    assert not train & val and not train & defense and not val & defense
    assert train | val | defense == set(range(4000))
    # the test split is a different tensor: no test image equals a training-split image
    full = dm.train_set.dataset.dataset.images.flatten(1)
    test_images = dm.test_clean.dataset.images.flatten(1)
    assert not bool((test_images[:50, None] == full[None]).all(-1).any())


def test_same_seed_same_splits():
    a = BackdoorDataModule("mnist5k", attack=BadNets(), seed=3)
    b = BackdoorDataModule("mnist5k", attack=BadNets(), seed=3)
    a.setup(), b.setup()
    assert subset_indices(a.val_clean) == subset_indices(b.val_clean)
    assert torch.equal(a.train_set.poison_indices, b.train_set.poison_indices)
    assert a.backdoor_info()["poison_fingerprint"] == b.backdoor_info()["poison_fingerprint"]


def test_loaders_yield_sample_batches(dm):
    batch = next(iter(dm.train_dataloader()))
    assert isinstance(batch, Sample)
    assert batch.x.shape == (64, 1, 28, 28) and batch.x.dtype == torch.float32
    assert 0 <= float(batch.x.min()) and float(batch.x.max()) <= 1
    assert batch.y.dtype == torch.long and batch.poisoned.dtype == torch.bool
    assert bool((batch.y[batch.poisoned] == TARGET).all())
    assert torch.equal(batch.y[~batch.poisoned], batch.original_y[~batch.poisoned])
    val, test = dm.val_dataloader(), dm.test_dataloader()
    assert len(val) == len(test) == 2
    for loader in (*val, *test, dm.defense_dataloader()):
        assert isinstance(next(iter(loader)), Sample)


@pytest.mark.parametrize("stage", ["val", "test"])
def test_poisoned_eval_sets_only_non_target(dm, stage):
    clean, poisoned = dm.eval_dataloaders(stage)
    n = 0
    for batch in poisoned:
        assert bool(batch.poisoned.all())
        assert bool((batch.y == TARGET).all())
        assert bool((batch.original_y != TARGET).all())
        n += len(batch.y)
    clean_labels = torch.cat([b.y for b in clean])
    assert n == int((clean_labels != TARGET).sum())
    assert not bool(torch.cat([b.poisoned for b in clean]).any())


def test_clean_training():
    dm = BackdoorDataModule("mnist5k", attack=None, batch_size=32)
    batch = next(iter(dm.train_dataloader()))
    assert isinstance(batch, Sample) and not bool(batch.poisoned.any())
    assert torch.equal(batch.y, batch.original_y)
    assert len(dm.val_dataloader()) == len(dm.test_dataloader()) == 1
    assert dm.eval_dataloaders("test")[1] is None
    info = dm.backdoor_info()
    assert info["attack"] is None and info["poison_rate"] == 0.0
    assert "poison_indices" not in dm.state_dict() and "attack_state" not in dm.state_dict()


def test_backdoor_info(dm):
    info = dm.backdoor_info()
    assert info["dataset"] == "mnist5k" and info["num_classes"] == 10 and info["train_size"] == 3300
    assert info["attack"] == "badnets"
    assert info["attack_params"]["patch_size"] == 3 and info["attack_params"]["location"] == "bottom_right"
    assert info["poison_rate"] == 0.1 and info["target"] == TARGET and info["poison_seed"] == 0
    train_labels = torch.tensor([dm.train_set.labels[i] for i in range(len(dm.train_set))])
    assert info["num_poisoned"] == round(0.1 * len(train_labels)) == 330  # share of the whole training set
    assert info["num_train"] == 3300
    assert info["num_cover"] == 0
    assert info["poison_fingerprint"] == dm.train_set.fingerprint


def test_state_dict(dm):
    state = dm.state_dict()
    assert (state["seed"], state["target"], state["rate"], state["dataset"]) == (0, TARGET, 0.1, "mnist5k")
    assert isinstance(dm.train_set, PoisonedDataset)
    assert torch.equal(state["poison_indices"], dm.train_set.poison_indices)
    assert state["cover_indices"].numel() == 0
    assert torch.equal(state["attack_state"]["patch"], dm.attack.patch)
    fresh = BadNets(seed=99)  # a different seed: the patch must come from the state
    dm2 = BackdoorDataModule("mnist5k", attack=fresh)
    dm2.load_state_dict(state)
    assert torch.equal(fresh.patch, dm.attack.patch)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"rate": 0}, ValueError, "rate"),
        ({"rate": -0.1}, ValueError, "rate"),
        ({"rate": 1.5}, ValueError, "rate"),
        ({"target": 10}, ValueError, "target"),
        ({"target": -1}, ValueError, "target"),
        ({"attack": "badnets"}, TypeError, "attack"),
        ({"dataset": "imagenet1k"}, ValueError, "unknown dataset 'imagenet1k'; known datasets: .*cifar10.*mnist5k"),
        ({"batch_size": 0}, ValueError, "batch_size"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    kwargs = {"attack": BadNets(), **kwargs}
    with pytest.raises(error, match=match):
        BackdoorDataModule(**kwargs)


def test_val_size_too_large():
    dm = BackdoorDataModule("mnist5k", attack=BadNets(), val_size=4000)
    with pytest.raises(ValueError, match="val_size"):
        dm.setup()
