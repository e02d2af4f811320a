"""Run by tests/test_distributed.py in a subprocess (not collected by pytest).

    python tests/ddp_worker.py train  CKPT            # a short poisoned training, saved as a checkpoint
    python tests/ddp_worker.py single CKPT OUT_DIR    # test on one process  -> OUT_DIR/rank0.json
    python tests/ddp_worker.py ddp    CKPT OUT_DIR    # test with strategy="ddp_fork", devices=2 on CPU
                                                      # (gloo)                 -> OUT_DIR/rank{0,1}.json

``ddp_fork`` forks both ranks from this process once it has imported everything (no second
interpreter start-up); every rank writes its own JSON: the logged metrics, the fitted detector
state, and which samples it evaluated.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("MASTER_ADDR", "127.0.0.1")  # the process group stays on loopback

import lightning as L  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tiny_net import TinyResNet  # noqa: E402

from lightning_backdoor import BackdoorClassifier, BackdoorDataModule  # noqa: E402
from lightning_backdoor.attacks import BadNets  # noqa: E402
from lightning_backdoor.callbacks import BackdoorMetrics, DetectionCallback  # noqa: E402
from lightning_backdoor.checkpoints import safe_load  # noqa: E402
from lightning_backdoor.detectors import IBDPSC, ScaleUp, Strip  # noqa: E402

TEST_SIZE = 151  # odd: not divisible by the world size, so a padding sampler would repeat samples


WIDTH = 16


def sgd(params):
    return torch.optim.SGD(params, lr=0.05, momentum=0.9)


def datamodule() -> BackdoorDataModule:
    return BackdoorDataModule("mnist5k", attack=BadNets(), target=0, rate=0.1, seed=0, val_size=100,
                              defense_size=100, test_size=TEST_SIZE, batch_size=64, eval_batch_size=40)


class SeenSamples(L.Callback):
    """Which sample indices this rank's own test loop evaluated, per dataloader."""

    def __init__(self) -> None:
        self.seen = {0: [], 1: []}

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self.seen[dataloader_idx].extend(batch[4].tolist())


def trainer(**kw) -> L.Trainer:
    return L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                     enable_checkpointing=False, num_sanity_val_steps=0, **kw)


def train(ckpt: str) -> None:
    L.seed_everything(0, workers=True)
    t = trainer(max_epochs=1, limit_train_batches=20, limit_val_batches=0, devices=1)
    t.fit(BackdoorClassifier(TinyResNet(width=WIDTH), optimizer=sgd), datamodule())
    t.save_checkpoint(ckpt)


class Report(L.Callback):
    """Writes this rank's results to ``out_dir/rank{r}.json`` when testing ends (every rank, also under DDP)."""

    def __init__(self, out_dir: str, detection: DetectionCallback, seen: SeenSamples) -> None:
        self.out_dir, self.detection, self.seen = out_dir, detection, seen

    def on_test_end(self, trainer, pl_module):
        sup, ibd, strip = self.detection.detectors
        out = {
            "rank": trainer.global_rank,
            "world_size": trainer.world_size,
            "metrics": {k: float(v) for k, v in trainer.callback_metrics.items()},
            "num_scored": self.detection.last_num_scored,
            "seen": {str(k): v for k, v in self.seen.seen.items()},
            "ibd_psc": {"k": ibd.k, "etas": ibd.etas},
            "scale_up": {"mean": sup.mean_per_class.tolist(), "std": sup.std_per_class.tolist(),
                         "threshold": sup.threshold},
            "strip": {"threshold": strip.threshold},
        }
        Path(self.out_dir).mkdir(parents=True, exist_ok=True)
        (Path(self.out_dir) / f"rank{trainer.global_rank}.json").write_text(json.dumps(out))


def evaluate(ckpt: str, out_dir: str, ddp: bool) -> None:
    """Test the checkpoint with the detectors; ``ddp``: two CPU processes forked from this one (gloo)."""
    L.seed_everything(0, workers=True)
    module = BackdoorClassifier(TinyResNet(width=WIDTH))
    module.load_state_dict(safe_load(ckpt)["state_dict"])
    detection = DetectionCallback([ScaleUp(mode="data_limited"), IBDPSC(), Strip(n=4)], stages=("test",),
                                  max_samples=None, noise_copies=True, progress=False, plots=False)
    metrics = BackdoorMetrics(stages=("test",), prefix="bm/{stage}")
    seen = SeenSamples()
    kw = dict(devices=2, strategy="ddp_fork") if ddp else dict(devices=1)
    t = trainer(callbacks=[detection, metrics, seen, Report(out_dir, detection, seen)], **kw)
    t.test(module, datamodule(), verbose=False)


if __name__ == "__main__":
    torch.set_num_threads(1)
    mode, ckpt_path = sys.argv[1], sys.argv[2]
    if mode == "train":
        train(ckpt_path)
    else:
        evaluate(ckpt_path, sys.argv[3], ddp=mode == "ddp")
