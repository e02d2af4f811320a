"""Datasets, poisoning and the Lightning data module."""

from .datamodule import BackdoorDataModule, CheckpointMismatchError, poisoned_test_set_from_checkpoint
from .finetune import DefenseFinetuneDataModule
from .datasets import DatasetNotFoundError, DatasetSpec, TensorImageDataset, get_spec, list_datasets, load_mnist5k
from .poisoned import (CleanDataset, DeviceTriggerSet, PoisonedDataset, Sample, dataset_labels, fingerprint,
                       select_poison_indices, stratified_split)

__all__ = [
    "BackdoorDataModule", "CheckpointMismatchError", "CleanDataset", "DefenseFinetuneDataModule", "DatasetNotFoundError",
    "DeviceTriggerSet", "DatasetSpec", "PoisonedDataset", "Sample",
    "TensorImageDataset", "dataset_labels", "fingerprint", "get_spec", "list_datasets", "load_mnist5k",
    "poisoned_test_set_from_checkpoint", "select_poison_indices", "stratified_split",
]
