"""Add backdoor detection and BA/ASR to an *existing* Lightning training whose module is not ours.

Your LightningModule stays as it is: the only requirement is that its forward returns logits for
images in [0, 1] (put normalisation inside the model). The callbacks take their samples from
loaders you hand them: clean (x, y) batches, and poisoned batches of the same images carrying a
trigger (here made with our BadNets attack; use your own if you have one).

    python examples/add_callback_to_my_training.py
"""

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_backdoor.attacks import BadNets
from lightning_backdoor.callbacks import BackdoorMetrics, DetectionCallback
from lightning_backdoor.data import load_mnist5k
from lightning_backdoor.detectors import IBDPSC, ScaleUp, Strip


class MyClassifier(L.LightningModule):
    """Somebody's existing module: plain (x, y) batches, its own loss and optimiser."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10),
        )

    def forward(self, x):
        return self.body(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_acc", (self(x).argmax(1) == y).float().mean())

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=2e-3)


def main() -> None:
    L.seed_everything(0)
    images, labels = load_mnist5k()
    x, y = images.float() / 255, labels
    trigger, target = BadNets(seed=0), 0
    # the user's own poisoning: 10% of the first 4000 images carry the trigger and the target label
    x_train, y_train = x[:4000].clone(), y[:4000].clone()
    idx = torch.randperm(4000)[:400]
    x_train[idx], y_train[idx] = trigger(x_train[idx]), target
    x_val, y_val = x[4000:4500], y[4000:4500]
    keep = y_val != target
    clean_val = DataLoader(TensorDataset(x_val, y_val), batch_size=100)
    poisoned_val = DataLoader(TensorDataset(trigger(x_val[keep]), y_val[keep]), batch_size=100)
    defender_data = DataLoader(TensorDataset(x[4500:], y[4500:]), batch_size=100)  # held apart

    callbacks = [
        DetectionCallback([ScaleUp(mode="data_limited"), IBDPSC(), Strip(n=10)], benign_loader=clean_val,
                          poisoned_loader=poisoned_val, fit_loader=defender_data, target=target,
                          max_samples=300, every_n_epochs=2),
        BackdoorMetrics(clean_loader=clean_val, poisoned_loader=poisoned_val, target=target),
    ]
    trainer = L.Trainer(max_epochs=4, callbacks=callbacks, logger=False, enable_checkpointing=False)
    trainer.fit(MyClassifier(), DataLoader(TensorDataset(x_train, y_train), batch_size=128, shuffle=True),
                clean_val)
    print({k: round(float(v), 4) for k, v in trainer.callback_metrics.items()})


if __name__ == "__main__":
    main()
