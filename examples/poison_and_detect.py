"""Plain-Python use of lightning_backdoor: poison a dataset, train, and watch three detectors.

The same pieces the CLI builds from YAML, assembled by hand as you would in an existing Lightning
script. Runs on the embedded MNIST digits: about a minute on 2 CPU cores (``--quick``: 3 epochs, under a
minute, what the tests run).

    python examples/poison_and_detect.py [--epochs 5] [--attack blended] [--quick]

It prints the test metrics and, on the last line, ``RESULTS {json}``.
"""

import argparse
import json

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
    parser.add_argument("--quick", action="store_true", help="3 epochs, 200 detection samples")
    args = parser.parse_args()
    epochs, samples = (3, 200) if args.quick else (args.epochs, 300)

    L.seed_everything(0)
    # batches of 64: about 50 steps per epoch on the 3,300 training digits
    data = BackdoorDataModule("mnist5k", attack=create_attack(args.attack), target=0, rate=0.1, batch_size=64,
                              eval_batch_size=500)
    net = create_model("resnet20", num_classes=10, in_channels=1, **DATASET_STATS["mnist"])
    module = BackdoorClassifier(
        net,
        optimizer=lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=5e-4),
        # annealed to zero by the last epoch: the final weights (and BN statistics) are settled, not mid-step
        scheduler=lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs),
        noise_sigmas=(0.05, 0.1),
    )
    detection = DetectionCallback([ScaleUp(mode="data_limited"), IBDPSC(), Strip(n=10)],
                                  stages=("test",), max_samples=samples)
    logger = WandbLogger(project="lightning-backdoor", offline=True) if args.wandb else None
    trainer = L.Trainer(max_epochs=epochs, callbacks=[detection], logger=logger or False,
                        enable_checkpointing=False, enable_model_summary=False)
    trainer.fit(module, data)
    trainer.test(module, data)
    results = {k: round(float(v), 4) for k, v in trainer.callback_metrics.items() if k.startswith("test/")}
    print("RESULTS " + json.dumps(results))
    return results


if __name__ == "__main__":
    main()
