"""Datasets, poisoning and the Lightning data module."""

from .datamodule import BackdoorDataModule
from .datasets import DatasetNotFoundError, DatasetSpec, TensorImageDataset, get_spec, list_datasets, load_mnist5k
from .poisoned import CleanDataset, PoisonedDataset, Sample, dataset_labels, fingerprint, select_poison_indices

__all__ = [
    "BackdoorDataModule", "CleanDataset", "DatasetNotFoundError", "DatasetSpec", "PoisonedDataset", "Sample",
    "TensorImageDataset", "dataset_labels", "fingerprint", "get_spec", "list_datasets", "load_mnist5k",
    "select_poison_indices",
]
