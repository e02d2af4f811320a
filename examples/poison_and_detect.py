"""Plain-Python use of lightning_backdoor: poison a dataset, train, and watch three detectors.

The same pieces the CLI builds from YAML, assembled by hand as you would in an existing Lightning
script. Runs on the embedded MNIST digits in a couple of minutes on a CPU.

    python examples/poison_and_detect.py [--epochs 5]
"""

import argparse

import lightning as L
import torch
from lightning.pytorch.loggers import WandbLogger

from lightning_backdoor import BackdoorClassifier, BackdoorDataModule
from lightning_backdoor.attacks import create_attack
from lightning_backdoor.callbacks import DetectionCallback
from lightning_backdoor.detectors import IBDPSC, ScaleUp, Strip
from lightning_backdoor.models import DATASET_STATS, create_model


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--attack", default="badnets", help="badnets | blended | wanet")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--wandb", action="store_true", help="log to W&B (offline run folder under ./wandb)")
    args = parser.parse_args()

    L.seed_everything(0)
    data = BackdoorDataModule("mnist5k", attack=create_attack(args.attack), target=0, rate=0.1)
    net = create_model("resnet20", num_classes=10, in_channels=1, **DATASET_STATS["mnist"])
    module = BackdoorClassifier(
        net,
        optimizer=lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=5e-4),
        noise_sigmas=(0.05, 0.1),
    )
    detection = DetectionCallback([ScaleUp(mode="data_limited"), IBDPSC(), Strip(n=10)],
                                  stages=("test",), max_samples=300)
    logger = WandbLogger(project="lightning-backdoor", offline=True) if args.wandb else None
    trainer = L.Trainer(max_epochs=args.epochs, callbacks=[detection], logger=logger or False,
                        enable_checkpointing=False)
    trainer.fit(module, data)
    results = trainer.test(module, data)
    print({k: round(float(v), 4) for k, v in trainer.callback_metrics.items() if k.startswith("test/")})
    return results


if __name__ == "__main__":
    main()
