"""Add backdoor detection and BA/ASR to an *existing* Lightning training whose module is not ours.

Your LightningModule stays as it is: the only requirement is that its forward returns logits for
images in [0, 1] (put normalisation inside the model; if it returns a tuple or dict, pass
``output_key=`` to the callbacks). The callbacks take their samples from loaders you hand them:
clean ``(x, y)`` batches, and poisoned batches of the same images carrying a trigger with their
TRUE labels (here made with our BadNets attack; use your own if you have one), plus a small clean
set held apart for fitting the data-limited detectors.

    python examples/add_callback_to_my_training.py            # ~25 seconds on 2 CPU cores (what the tests run)
    python examples/add_callback_to_my_training.py --quick    # ~15 seconds: 3 epochs (IBD-PSC's layer
                                                              # selection may then find no usable k and skip)

It prints the final metrics and, on the last line, ``RESULTS {json}``.
"""

import argparse
import json

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_backdoor.attacks import BadNets
from lightning_backdoor.callbacks import BackdoorMetrics, DetectionCallback
from lightning_backdoor.data import load_mnist5k, stratified_split
from lightning_backdoor.detectors import IBDPSC, ScaleUp, Strip


class MyClassifier(L.LightningModule):
    """Somebody's existing module: plain (x, y) batches, its own loss, optimiser and a small residual CNN."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                                  nn.MaxPool2d(2))
        self.block = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                                   nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16))
        self.head = nn.Sequential(nn.MaxPool2d(2), nn.Conv2d(16, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32),
                                  nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))

    def forward(self, x):
        h = self.stem(x)
        return self.head(torch.relu(h + self.block(h)))

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


def main() -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--quick", action="store_true", help="3 epochs, 200 detection samples")
    args = parser.parse_args()
    epochs, samples = (3, 200) if args.quick else (args.epochs, 300)
    batch_size = 32  # 130 steps per epoch: the 4,200 training digits are few for batches of 128

    L.seed_everything(0)
    images, labels = load_mnist5k()  # stored sorted by label: never slice it, split it at random
    x, y = images.float() / 255, labels
    val_idx, defender_idx, train_idx = stratified_split(y, [500, 300], seed=0)
    trigger, target = BadNets(seed=0), 0

    # the user's own poisoning: 10% of the training images carry the trigger and the target label
    x_train, y_train = x[train_idx].clone(), y[train_idx].clone()
    candidates = torch.nonzero(y_train != target).flatten()
    poisoned = candidates[torch.randperm(len(candidates), generator=torch.Generator().manual_seed(0))]
    poisoned = poisoned[: round(0.1 * len(x_train))]
    x_train[poisoned], y_train[poisoned] = trigger(x_train[poisoned]), target

    x_val, y_val = x[val_idx], y[val_idx]
    keep = y_val != target  # ASR is measured on inputs whose true label is not the target
    clean_val = DataLoader(TensorDataset(x_val, y_val), batch_size=100)
    poisoned_val = DataLoader(TensorDataset(trigger(x_val[keep]), y_val[keep]), batch_size=100)  # TRUE labels
    defender_data = DataLoader(TensorDataset(x[defender_idx], y[defender_idx]), batch_size=100)  # held apart

    callbacks = [
        DetectionCallback([ScaleUp(mode="data_limited"), IBDPSC(), Strip(n=10)], benign_loader=clean_val,
                          poisoned_loader=poisoned_val, fit_loader=defender_data, target=target,
                          max_samples=samples, fit_samples=300, every_n_epochs=epochs, stages="validate"),
        BackdoorMetrics(clean_loader=clean_val, poisoned_loader=poisoned_val, target=target, stages="validate"),
    ]
    trainer = L.Trainer(max_epochs=epochs, callbacks=callbacks, logger=False, enable_checkpointing=False,
                        enable_model_summary=False)
    train = DataLoader(TensorDataset(x_train, y_train), batch_size=batch_size, shuffle=True)
    trainer.fit(MyClassifier(), train, clean_val)
    results = {k: round(float(v), 4) for k, v in trainer.callback_metrics.items()}
    for key, value in sorted(results.items()):
        print(f"{key:32s} {value}")
    print("RESULTS " + json.dumps(results))
    return results


if __name__ == "__main__":
    main()
