"""Base datasets loaded by the real torchvision code from small files written here in the real formats."""

import pickle
import re
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from lightning_backdoor.attacks import BadNets
from lightning_backdoor.data import BackdoorDataModule, DatasetNotFoundError, Sample, get_spec, list_datasets
from lightning_backdoor.data.datasets import _load_cifar10, _load_gtsrb, _load_imagefolder, _load_mnist

CIFAR_TRAIN = [f"data_batch_{i}" for i in range(1, 6)]


def write_cifar10(root, per_file: int = 6, seed: int = 0):
    """CIFAR-10 python pickles (rows of 3072 uint8: R plane, G plane, B plane) under root/cifar-10-batches-py."""
    base = root / "cifar-10-batches-py"
    base.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    written = {}
    for name in CIFAR_TRAIN + ["test_batch"]:
        data = rng.integers(0, 256, size=(per_file, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, size=per_file)]
        with open(base / name, "wb") as f:
            pickle.dump({"batch_label": name, "data": data, "labels": labels}, f)
        written[name] = (data, labels)
    with open(base / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"class{i}" for i in range(10)], "num_vis": 3072}, f)
    return written


def write_mnist_raw(root, n_train: int = 30, n_test: int = 10, seed: int = 0):
    """Uncompressed idx files under root/MNIST/raw, as torchvision expects them."""
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    written = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(struct.pack(">IIII", 2051, n, 28, 28) + images.tobytes())
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(struct.pack(">II", 2049, n) + labels.tobytes())
        written[prefix] = (images, labels)
    return written


def write_imagefolder(root, classes=("cat", "dog", "fox"), per_class: int = 4, size=(20, 30), seed: int = 0):
    rng = np.random.default_rng(seed)
    for split in ("train", "val"):
        for c in classes:
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(per_class):
                Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(d / f"{i}.png")


@pytest.fixture
def no_download(monkeypatch):
    """Any attempt to download fails the test at once (instead of hanging without a network)."""
    import torchvision.datasets.cifar as cifar
    import torchvision.datasets.gtsrb as gtsrb
    import torchvision.datasets.mnist as mnist

    def fail(*args, **kwargs):
        raise AssertionError(f"unexpected download attempt: {args} {kwargs}")

    for module in (cifar, mnist, gtsrb):
        for name in ("download_and_extract_archive", "download_url"):
            if hasattr(module, name):
                monkeypatch.setattr(module, name, fail)


# -- CIFAR-10 --------------------------------------------------------------------------------------
def test_cifar10_pixels_round_trip(tmp_path, no_download):
    written = write_cifar10(tmp_path)
    train, test = _load_cifar10(str(tmp_path), verify_integrity=False)
    assert len(train) == 5 * 6 and len(test) == 6
    rows = np.concatenate([written[n][0] for n in CIFAR_TRAIN])
    labels = sum((written[n][1] for n in CIFAR_TRAIN), [])
    expected = torch.from_numpy(rows).reshape(-1, 3, 32, 32)
    assert train.images.dtype == torch.uint8 and torch.equal(train.images, expected)
    assert train.targets.tolist() == labels
    assert torch.equal(test.images, torch.from_numpy(written["test_batch"][0]).reshape(-1, 3, 32, 32))
    x, y = train[7]
    assert x.dtype == torch.float32 and torch.equal((x * 255).round().to(torch.uint8), expected[7]) and y == labels[7]


def test_cifar10_md5_check_fails_clearly(tmp_path, no_download):
    write_cifar10(tmp_path)
    with pytest.raises(DatasetNotFoundError, match="md5.*verify_integrity=False"):
        _load_cifar10(str(tmp_path), verify_integrity=True)


def test_cifar10_missing_root(tmp_path, no_download):
    missing = tmp_path / "nowhere"
    with pytest.raises(DatasetNotFoundError, match=rf"{re.escape(str(missing))}.*cifar-10-batches-py.*download=True"):
        _load_cifar10(str(missing))
    with pytest.raises(DatasetNotFoundError, match="root"):
        _load_cifar10(None)
    dm = BackdoorDataModule("cifar10", root=str(missing), attack=BadNets())
    with pytest.raises(DatasetNotFoundError, match=re.escape(str(missing))):
        dm.setup()


def test_cifar10_missing_meta_without_integrity_check(tmp_path, no_download):
    write_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "batches.meta").unlink()
    with pytest.raises(DatasetNotFoundError, match="CIFAR-10"):
        _load_cifar10(str(tmp_path), verify_integrity=False)


def test_cifar10_datamodule(tmp_path, no_download):
    write_cifar10(tmp_path, per_file=12)
    dm = BackdoorDataModule("cifar10", root=str(tmp_path), attack=BadNets(), verify_integrity=False,
                            val_size=10, defense_size=5, batch_size=8)
    dm.setup()
    assert (len(dm.train_set), len(dm.val_clean), len(dm.defense_set), len(dm.test_clean)) == (45, 10, 5, 12)
    batch = next(iter(dm.train_dataloader()))
    assert isinstance(batch, Sample) and batch.x.shape == (8, 3, 32, 32)


# -- MNIST -----------------------------------------------------------------------------------------
def test_mnist_raw_idx(tmp_path, no_download):
    written = write_mnist_raw(tmp_path)
    train, test = _load_mnist(str(tmp_path))
    assert torch.equal(train.images, torch.from_numpy(written["train"][0]).unsqueeze(1))
    assert train.targets.tolist() == written["train"][1].tolist()
    assert torch.equal(test.images, torch.from_numpy(written["t10k"][0]).unsqueeze(1))
    x, y = test[3]
    assert x.shape == (1, 28, 28) and x.dtype == torch.float32 and y == 3


def test_mnist_missing(tmp_path, no_download):
    with pytest.raises(DatasetNotFoundError, match=rf"{re.escape(str(tmp_path))}.*MNIST/raw.*download=True"):
        _load_mnist(str(tmp_path))


# -- ImageFolder -----------------------------------------------------------------------------------
def test_imagefolder_loads_and_resizes(tmp_path):
    write_imagefolder(tmp_path)
    train, test = _load_imagefolder(str(tmp_path), image_size=(16, 16))
    assert len(train) == len(test) == 12
    assert train.targets == [0] * 4 + [1] * 4 + [2] * 4
    x, y = train[5]
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32 and y == 1
    assert 0 <= float(x.min()) and float(x.max()) <= 1


def test_imagefolder_datamodule(tmp_path):
    write_imagefolder(tmp_path, per_class=6)
    dm = BackdoorDataModule("imagefolder", root=str(tmp_path), attack=BadNets(), target=2, image_size=(24, 24),
                            val_size=3, defense_size=3, batch_size=4)
    dm.setup()
    assert dm.num_classes == 3
    assert (len(dm.train_set), len(dm.val_clean), len(dm.defense_set), len(dm.test_clean)) == (12, 3, 3, 18)
    batch = next(iter(dm.train_dataloader()))
    assert isinstance(batch, Sample) and batch.x.shape == (4, 3, 24, 24)
    poisoned = next(iter(dm.eval_dataloaders("test")[1]))
    assert bool((poisoned.y == 2).all()) and bool((poisoned.original_y != 2).all())


def test_imagefolder_target_outside_found_classes(tmp_path):
    write_imagefolder(tmp_path)
    dm = BackdoorDataModule("imagefolder", root=str(tmp_path), attack=BadNets(), target=5, val_size=2, defense_size=1)
    with pytest.raises(ValueError, match="target"):
        dm.setup()


def test_imagefolder_missing(tmp_path):
    with pytest.raises(DatasetNotFoundError, match=rf"{re.escape(str(tmp_path / 'train'))}.*ImageFolder layout"):
        _load_imagefolder(str(tmp_path))


# -- GTSRB -----------------------------------------------------------------------------------------
def test_gtsrb_missing(tmp_path, no_download):
    with pytest.raises(DatasetNotFoundError, match=rf"GTSRB.*{re.escape(str(tmp_path))}.*download=True"):
        _load_gtsrb(str(tmp_path))
    dm = BackdoorDataModule("gtsrb", root=str(tmp_path), attack=BadNets())
    with pytest.raises(DatasetNotFoundError, match="GTSRB"):
        dm.setup()


# -- registry of dataset names ----------------------------------------------------------------------
def test_unknown_dataset_lists_known():
    with pytest.raises(ValueError, match="unknown dataset 'cifar100'; known datasets: " + ", ".join(list_datasets())):
        get_spec("cifar100")
    assert get_spec("CIFAR10").name == "cifar10"
