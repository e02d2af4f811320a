"""``DefenseFinetuneDataModule``: fine-tune on the defender's small clean share, evaluate like the attack run."""

from __future__ import annotations

from torch.utils.data import DataLoader

from .datamodule import BackdoorDataModule
from .poisoned import CleanDataset


class DefenseFinetuneDataModule(BackdoorDataModule):
    """A :class:`BackdoorDataModule` whose **training** loader is the held-apart clean ``defense_set``.

    Defences that repair a model by fine-tuning (Neural Cleanse unlearning,
    :class:`~lightning_backdoor.losses.NeuralCleanseUnlearning`) hold only a small clean share of the
    data (paper: 10% of the training set). This data module rebuilds the attack run's splits from
    the same arguments (dataset, attack, target, rate, seed), so the validation/test loaders --
    clean and poisoned, for BA and ASR -- are the attack run's, and trains on the ``defense_size``
    clean images held apart from training (stratified by class; augmented like the training set when
    ``augment``). The poisoned training samples are never seen. ``defense_dataloader()`` returns the
    same clean images without augmentation (what loss terms and detectors fit on).

    Example:
        >>> from lightning_backdoor.attacks import BadNets
        >>> dm = DefenseFinetuneDataModule("mnist5k", attack=BadNets(), target=0, defense_size=400)
        >>> len(dm.train_dataloader().dataset)
        400
    """

    def train_dataloader(self) -> DataLoader:
        self._ensure()
        if len(self.defense_set) == 0:
            raise ValueError("DefenseFinetuneDataModule trains on the held-apart clean split, but defense_size=0; "
                             "set defense_size to the defender's clean share (e.g. 400, 10% of mnist5k's training set)")
        aug = self._augmentation(tuple(self.defense_set[0].x.shape[-2:])) if self.augment else None
        clean = CleanDataset(self.defense_set.dataset, transform=aug, indices=self.defense_set.indices)
        return self._loader(clean, train=True)
