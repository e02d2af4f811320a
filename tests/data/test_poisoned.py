"""Poisoned index selection and ``PoisonedDataset``: which samples carry the trigger and what each yields."""

import pytest
import torch
from torchvision.transforms import v2

from lightning_backdoor.attacks import BadNets, Blended, WaNet, create_attack
from lightning_backdoor.data import PoisonedDataset, TensorImageDataset, fingerprint, select_poison_indices

NUM_CLASSES = 10
TARGET = 0


def make_dataset(n: int = 200, channels: int = 1, size: int = 8, seed: int = 0, labels=None) -> TensorImageDataset:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, channels, size, size), generator=g, dtype=torch.uint8)
    labels = torch.arange(n) % NUM_CLASSES if labels is None else torch.as_tensor(labels)
    return TensorImageDataset(images, labels)


# -- select_poison_indices -----------------------------------------------------------------------
def test_select_same_seed_same_set_different_seed_different_set():
    labels = torch.arange(1000) % NUM_CLASSES
    a = select_poison_indices(labels, TARGET, 0.1, seed=3)
    b = select_poison_indices(labels, TARGET, 0.1, seed=3)
    c = select_poison_indices(labels, TARGET, 0.1, seed=4)
    assert torch.equal(a, b)
    assert set(a.tolist()) != set(c.tolist())
    assert fingerprint(a) == fingerprint(b) != fingerprint(c)


@pytest.mark.parametrize("rate", [0.01, 0.1, 0.25, 0.9])
def test_select_count_and_only_non_target(rate):
    labels = torch.arange(997) % NUM_CLASSES  # 99 or 100 per class
    idx = select_poison_indices(labels, TARGET, rate, seed=0)
    # the field's convention: rate is the poisoned share of the WHOLE training set
    assert len(idx) == round(rate * len(labels))
    assert len(set(idx.tolist())) == len(idx)  # no repeats
    assert bool((labels[idx] != TARGET).all())
    assert torch.equal(idx, torch.sort(idx).values)


def test_select_independent_of_and_not_consuming_global_rng():
    labels = torch.arange(500) % NUM_CLASSES
    torch.manual_seed(1)
    a = select_poison_indices(labels, TARGET, 0.2, seed=7)
    torch.manual_seed(12345)
    state = torch.get_rng_state()
    b = select_poison_indices(labels, TARGET, 0.2, seed=7)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a, b)


def test_select_clean_label_picks_only_target_class():
    labels = torch.arange(1000) % NUM_CLASSES
    idx = select_poison_indices(labels, 3, 0.05, seed=0, dirty_label=False)
    assert bool((labels[idx] == 3).all())
    assert len(idx) == round(0.05 * 1000)


@pytest.mark.parametrize("dirty", [True, False])
def test_select_rate_larger_than_the_candidates_is_refused(dirty):
    labels = torch.arange(100) % NUM_CLASSES
    with pytest.raises(ValueError, match=r"rate=0\.\d+ asks for \d+ poisoned samples .* the largest rate is"):
        select_poison_indices(labels, 3, 0.95 if dirty else 0.2, seed=0, dirty_label=dirty)


# -- PoisonedDataset, train mode -------------------------------------------------------------------
@pytest.mark.parametrize("attack_fn", [lambda: BadNets(patch_size=3), lambda: Blended(alpha=0.2), lambda: WaNet(k=4)],
                         ids=["badnets", "blended", "wanet"])
def test_train_items_poisoned_and_clean(attack_fn):
    base = make_dataset()
    attack = attack_fn()
    ds = PoisonedDataset(base, attack, TARGET, NUM_CLASSES, rate=0.1, seed=0)
    poisoned = set(ds.poison_indices.tolist())
    cover = set(ds.cover_indices.tolist())
    assert len(ds) == len(base)
    assert len(poisoned) == round(0.1 * len(base))
    # cover (noise-mode) samples: cross_ratio x the number poisoned
    assert len(cover) == round(getattr(attack, "cover_ratio", 0.0) * len(poisoned))
    assert not poisoned & cover
    for i in range(len(ds)):
        x, y, is_poisoned, original_y, index = ds[i]
        clean_x, true_y = base[i]
        assert index == i and original_y == true_y
        assert is_poisoned == (i in poisoned)
        if i in poisoned:
            assert y == TARGET and true_y != TARGET
            assert torch.equal(x, attack(clean_x))
        elif i in cover:
            assert y == true_y
            assert not torch.equal(x, clean_x)
        else:
            assert y == true_y
            assert torch.equal(x, clean_x)


def test_wanet_cover_samples_keep_label_and_differ_from_clean_and_trigger():
    base = make_dataset(channels=3, size=16)
    attack = WaNet(k=4, s=0.5, cross_ratio=2.0)
    ds = PoisonedDataset(base, attack, TARGET, NUM_CLASSES, rate=0.1, seed=0)
    assert len(ds.cover_indices) == round(2.0 * 0.1 * len(base))
    for i in ds.cover_indices.tolist():
        x, y, is_poisoned, original_y, _ = ds[i]
        clean_x, true_y = base[i]
        assert (y, original_y, is_poisoned) == (true_y, true_y, False)
        assert (x - clean_x).abs().max() > 1e-3
        assert not torch.allclose(x, attack(clean_x))  # the cover warp is the trigger plus random noise


def test_clean_label_attack_keeps_labels():
    class CleanLabelBadNets(BadNets):
        dirty_label = False

    base = make_dataset()
    ds = PoisonedDataset(base, CleanLabelBadNets(), TARGET, NUM_CLASSES, rate=0.05, seed=0)
    assert bool((base.targets[ds.poison_indices] == TARGET).all())
    for i in ds.poison_indices.tolist():
        _, y, is_poisoned, original_y, _ = ds[i]
        assert is_poisoned and y == original_y == TARGET


def test_info_and_fingerprint():
    base = make_dataset()
    a = PoisonedDataset(base, BadNets(patch_size=2, seed=5), TARGET, NUM_CLASSES, rate=0.2, seed=1)
    b = PoisonedDataset(base, BadNets(patch_size=2, seed=5), TARGET, NUM_CLASSES, rate=0.2, seed=1)
    c = PoisonedDataset(base, BadNets(patch_size=2, seed=5), TARGET, NUM_CLASSES, rate=0.2, seed=2)
    info = a.info()
    assert info["attack"] == "badnets"
    assert info["attack_params"]["patch_size"] == 2 and info["attack_params"]["seed"] == 5
    assert info["poison_rate"] == 0.2 and info["target"] == TARGET and info["poison_seed"] == 1
    assert info["num_poisoned"] == len(a.poison_indices)
    assert info["poison_fingerprint"] == a.fingerprint == b.fingerprint == fingerprint(a.poison_indices)
    assert c.fingerprint != a.fingerprint


# -- PoisonedDataset, test mode (the ASR set) ------------------------------------------------------
def test_test_mode_only_non_target_all_triggered():
    base = make_dataset(n=50)
    attack = BadNets()
    ds = PoisonedDataset(base, attack, TARGET, NUM_CLASSES, rate=1.0, mode="test")
    assert len(ds) == int((base.targets != TARGET).sum())
    for i in range(len(ds)):
        x, y, is_poisoned, original_y, index = ds[i]
        clean_x, true_y = base[index]
        assert is_poisoned and y == TARGET and original_y == true_y != TARGET
        assert torch.equal(x, attack(clean_x))


# -- where the trigger sits relative to augmentation -----------------------------------------------
def test_trigger_applied_before_augmentation():
    base = make_dataset(channels=3, size=16)
    attack = BadNets(patch_size=3, location="bottom_right")
    flip = v2.RandomHorizontalFlip(p=1.0)
    ds = PoisonedDataset(base, attack, TARGET, NUM_CLASSES, rate=0.1, seed=0, transform=flip)
    i = int(ds.poison_indices[0])
    clean_x = base[i][0]
    x = ds[i].x
    assert torch.equal(x, flip(attack(clean_x)))
    assert not torch.equal(x, attack(flip(clean_x)))
    assert torch.equal(x[:, -3:, :3], attack.patch.flip(-1))  # the patch moved with the flip
    j = next(k for k in range(len(ds)) if k not in set(ds.poison_indices.tolist()))
    assert torch.equal(ds[j].x, flip(base[j][0]))


# -- bad input -------------------------------------------------------------------------------------
@pytest.mark.parametrize("rate", [0, -0.1, 1.5])
def test_bad_rate(rate):
    base = make_dataset()
    with pytest.raises(ValueError, match="rate"):
        PoisonedDataset(base, BadNets(), TARGET, NUM_CLASSES, rate=rate)
    with pytest.raises(ValueError, match="rate"):
        select_poison_indices(base.targets, TARGET, rate, seed=0)


@pytest.mark.parametrize("target", [-1, NUM_CLASSES])
def test_target_outside_classes(target):
    with pytest.raises(ValueError, match="target"):
        PoisonedDataset(make_dataset(), BadNets(), target, NUM_CLASSES)


def test_only_target_class_samples():
    base = make_dataset(n=20, labels=torch.full((20,), TARGET))
    with pytest.raises(ValueError, match="non-target.*target=0"):
        PoisonedDataset(base, BadNets(), TARGET, NUM_CLASSES)
    with pytest.raises(ValueError, match="not the target"):
        PoisonedDataset(base, BadNets(), TARGET, NUM_CLASSES, mode="test")


@pytest.mark.parametrize("bad_label", [-1, NUM_CLASSES])
def test_labels_outside_num_classes(bad_label):
    labels = torch.arange(20) % NUM_CLASSES
    labels[5] = bad_label
    with pytest.raises(ValueError, match=r"labels.*num_classes=10"):
        PoisonedDataset(make_dataset(n=20, labels=labels), BadNets(), TARGET, NUM_CLASSES)


def test_empty_dataset():
    base = TensorImageDataset(torch.zeros(0, 1, 8, 8, dtype=torch.uint8), torch.zeros(0, dtype=torch.long))
    with pytest.raises(ValueError, match="empty"):
        PoisonedDataset(base, BadNets(), TARGET, NUM_CLASSES)


def test_bad_mode_and_attack():
    with pytest.raises(ValueError, match="mode"):
        PoisonedDataset(make_dataset(), BadNets(), TARGET, NUM_CLASSES, mode="eval")
    with pytest.raises(TypeError, match="attack"):
        PoisonedDataset(make_dataset(), "badnets", TARGET, NUM_CLASSES)


def test_unknown_attack_name_lists_known():
    with pytest.raises(ValueError, match="unknown attack 'nope'.*badnets.*blended.*wanet"):
        create_attack("nope")
