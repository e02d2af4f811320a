"""Poisoned-training throughput relative to clean training (goal: poisoned / clean >= 0.95).

    python benchmarks/bench_poison_throughput.py [--repeats 7] [--batches 6] [--batch-size 128]

What is timed: full training steps -- ``next(batch)`` from ``BackdoorDataModule.train_dataloader()``
(poisoning, augmentation, collation), forward, backward and an SGD step -- on the embedded
MNIST-5k digits, with ``create_model("resnet20", in_channels=1, width=8)``. The clean run
(``attack=None``) and the BadNets / Blended / WaNet runs use the same model, loader settings and
batch size. Measurements are interleaved (clean, BadNets, Blended, WaNet, clean, ... with the
order rotated each repeat) so drifting load on a shared machine hits every variant alike; each
variant reports the median images/s over ``--repeats`` after one untimed warm-up round; the
ratio is median(poisoned) / median(clean), and "paired" the median over rounds of the ratio to the
clean run of the same round. About a minute on 2 CPU cores with the defaults.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
import warnings
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from lightning_backdoor.attacks import Attack, BadNets, Blended, WaNet
from lightning_backdoor.data import BackdoorDataModule
from lightning_backdoor.models import DATASET_STATS, create_model


def make_datamodule(attack: Optional[Attack], args: argparse.Namespace) -> BackdoorDataModule:
    dm = BackdoorDataModule("mnist5k", attack=attack, target=0, rate=args.rate, seed=0,
                            batch_size=args.batch_size, num_workers=args.num_workers, augment=True)
    dm.setup("fit")
    return dm


def train_steps(net: nn.Module, opt: torch.optim.Optimizer, dm: BackdoorDataModule, batches: int) -> float:
    """Images per second over ``batches`` full steps, data loading included."""
    net.train()
    images = 0
    start = time.perf_counter()
    loader = dm.train_dataloader()
    it = iter(loader)
    for _ in range(batches):
        try:
            batch = next(it)
        except StopIteration:  # fewer batches per epoch than asked: start a new epoch
            it = iter(loader)
            batch = next(it)
        x, y, *_ = batch
        loss = F.cross_entropy(net(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        images += len(x)
    return images / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds (median reported)")
    parser.add_argument("--batches", type=int, default=6, help="training steps per timed run")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--num-workers", type=int, default=0, help="DataLoader workers (0: loading in the step)")
    parser.add_argument("--rate", type=float, default=0.1, help="poison rate")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: stable ratios on a shared CPU; 0 = torch's choice)")
    args = parser.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")

    attacks: Dict[str, Optional[Attack]] = {"clean": None, "badnets": BadNets(patch_size=3), "blended": Blended(alpha=0.2),
                                            "wanet": WaNet(k=4, s=0.5, cross_ratio=2.0)}
    dms = {name: make_datamodule(attack, args) for name, attack in attacks.items()}
    torch.manual_seed(0)
    base = create_model("resnet20", num_classes=10, in_channels=1, width=8, **DATASET_STATS["mnist"])
    nets = {name: copy.deepcopy(base) for name in attacks}
    opts = {name: torch.optim.SGD(nets[name].parameters(), lr=0.01, momentum=0.9) for name in attacks}

    names = list(attacks)
    results: Dict[str, List[float]] = {name: [] for name in names}
    for name in names:  # warm-up round (allocator, first-call overheads), not timed
        train_steps(nets[name], opts[name], dms[name], max(2, args.batches // 4))
    for r in range(args.repeats):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            results[name].append(train_steps(nets[name], opts[name], dms[name], args.batches))

    print(f"mnist5k, resnet20(width=8, in_channels=1), batch {args.batch_size}, {args.batches} steps x "
          f"{args.repeats} repeats, num_workers={args.num_workers}, threads={torch.get_num_threads()}, "
          f"rate={args.rate}, augment=True")
    clean = statistics.median(results["clean"])
    print(f"{'variant':<10}{'median img/s':>14}{'min':>10}{'max':>10}{'poisoned/clean':>16}{'paired':>8}")
    worst = float("inf")
    for name in names:
        med = statistics.median(results[name])
        ratio = med / clean
        if name != "clean":
            worst = min(worst, ratio)
        paired = statistics.median(p / c for p, c in zip(results[name], results["clean"]))
        ratio_s, paired_s = ("", "") if name == "clean" else (f"{ratio:.3f}", f"{paired:.3f}")
        print(f"{name:<10}{med:>14.1f}{min(results[name]):>10.1f}{max(results[name]):>10.1f}{ratio_s:>16}{paired_s:>8}")
    print(f"worst ratio {worst:.3f} ({'meets' if worst >= 0.95 else 'misses'} the 0.95 goal)")


if __name__ == "__main__":
    main()
