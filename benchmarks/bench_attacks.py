"""Every registered attack on the embedded MNIST-5k with the quickstart's ResNet-20: BA, ASR, counts, fit time, throughput.

    python benchmarks/bench_attacks.py [--epochs 3] [--attacks badnets,adaptive_*] [--min-rate 0.01]

For a clean model and then each attack in ``list_attacks()`` (so attacks registered later join
without touching this file; ``--attacks`` takes comma-separated fnmatch patterns):

- data: ``BackdoorDataModule("mnist5k", attack, target=0, rate, seed=0)`` with 1,000 test digits,
  no validation or defence split (4,000 training digits); ``rate`` is the attack's paper rate
  (``Attack.default_rate``) raised to ``--min-rate`` (default 1%: on 4,000 digits the papers' 0.3%
  of Adap-Patch/Adap-Blend would be 12 images), or ``--rate`` for every attack;
- model: the quickstart's CIFAR-style ResNet-20 (``CifarResNet([3, 3, 3], width=16)``, MNIST
  normalisation inside), SGD 0.05 / momentum 0.9 / Nesterov / weight decay 5e-4, cosine schedule
  over ``--epochs``, batch 128, seeded; a plain PyTorch loop over the data module's training loader
  (poisoning, cover samples and clean-image hooks included);
- BA on the clean test set, ASR on the poisoned test set (non-target test digits with the
  test-time trigger, labelled with the target), BA drop = clean model's BA - the attack's BA;
- fit time: the wall time of ``attack.fit(...)`` (called by the data module for ``requires_fit``
  attacks; "-" for the others);
- throughput: poisoned/clean training images per second measured side by side after training —
  ``--tp-rounds`` rounds of ``--tp-batches`` full training steps (loading included) on a fresh model,
  alternating the clean and the poisoned data module, ratio of the medians.

Prints a Markdown table. Run time, measured: ``--epochs 4`` took 2,138 s for the clean model and
seven attacks on a 2-core machine shared with other jobs (load about 8; 40-80 s per epoch, about
4.5 minutes per model). The default 3 epochs at the ~25-35 s per epoch seen under lighter load
make about 2 minutes per model, so a clean model and 8 attacks in about 18-20 minutes (estimated).
"""

from __future__ import annotations

import argparse
import fnmatch
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightning_backdoor.attacks import ATTACKS, Attack, create_attack, list_attacks  # noqa: E402
from lightning_backdoor.data import BackdoorDataModule  # noqa: E402
from lightning_backdoor.models import CifarResNet  # noqa: E402


def make_net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return CifarResNet(num_blocks=[3, 3, 3], width=16, num_classes=10, in_channels=1, mean=[0.1307], std=[0.3081])


def make_dm(attack: Optional[Attack], rate: float, args) -> BackdoorDataModule:
    dm = BackdoorDataModule("mnist5k", attack=attack, target=0, rate=rate, seed=args.seed, val_size=0,
                            defense_size=0, test_size=1000, batch_size=args.batch_size, eval_batch_size=500)
    dm.setup("fit")
    return dm


def optimiser(net: nn.Module, epochs: int):
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4, nesterov=True)
    return opt, torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)


def train(net: nn.Module, dm: BackdoorDataModule, epochs: int, seed: int) -> float:
    """Train for ``epochs``; returns the wall time per epoch."""
    torch.manual_seed(seed)
    opt, sched = optimiser(net, epochs)
    loader = dm.train_dataloader()
    start = time.perf_counter()
    for epoch in range(epochs):
        loader.set_epoch(epoch) if hasattr(loader, "set_epoch") else None
        net.train()
        for batch in loader:
            x, y = batch[0], batch[1]
            loss = F.cross_entropy(net(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sched.step()
    return (time.perf_counter() - start) / epochs


@torch.no_grad()
def accuracy(net: nn.Module, ds) -> float:
    net.eval()
    loader = torch.utils.data.DataLoader(ds, batch_size=500)
    correct = total = 0
    for batch in loader:
        x, y = batch[0], batch[1]
        correct += int((net(x).argmax(1) == y).sum())
        total += len(y)
    return correct / max(total, 1)


def images_per_second(dm: BackdoorDataModule, batches: int, seed: int) -> float:
    net = make_net(seed)
    opt, _ = optimiser(net, 1)
    net.train()
    loader = dm.train_dataloader()
    it = iter(loader)
    images = 0
    start = time.perf_counter()
    for _ in range(batches):
        try:
            batch = next(it)
        except StopIteration:
            it = iter(loader)
            batch = next(it)
        x, y = batch[0], batch[1]
        loss = F.cross_entropy(net(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        images += len(x)
    return images / (time.perf_counter() - start)


def throughput_ratio(clean: BackdoorDataModule, poisoned: BackdoorDataModule, args) -> float:
    images_per_second(clean, 1, 0)  # warm-up
    images_per_second(poisoned, 1, 0)
    c: List[float] = []
    p: List[float] = []
    for r in range(args.tp_rounds):
        pair = [(clean, c), (poisoned, p)]
        for dm, out in (pair if r % 2 == 0 else pair[::-1]):  # alternate the order: drifting load hits both
            out.append(images_per_second(dm, args.tp_batches, r))
    return statistics.median(p) / statistics.median(c)


def build_attack(name: str) -> Attack:
    try:
        return create_attack(name, seed=0)
    except TypeError:
        return create_attack(name)


def timed_fit(attack: Attack, record: Dict[str, float]) -> None:
    """Wrap ``attack.fit`` to record its wall time (the data module calls it in ``setup``)."""
    original = attack.fit

    def fit(*a, **kw):
        start = time.perf_counter()
        out = original(*a, **kw)
        record["fit"] = time.perf_counter() - start
        return out

    attack.fit = fit  # type: ignore[method-assign]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--attacks", default="*", help="comma-separated fnmatch patterns of registry names")
    parser.add_argument("--rate", type=float, default=None, help="one poison rate for every attack")
    parser.add_argument("--min-rate", type=float, default=0.01, help="raise paper rates below this")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--tp-batches", type=int, default=5)
    parser.add_argument("--tp-rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=UserWarning)
    patterns = [p for p in args.attacks.split(",") if p]
    names = [n for n in list_attacks() if any(fnmatch.fnmatch(n, p) for p in patterns)]
    names = [n for n in names if not getattr(ATTACKS.get(n), "trainable", False)]  # batch-level attacks: elsewhere
    start_all = time.perf_counter()

    clean_dm = make_dm(None, 0.1, args)
    net = make_net(args.seed)
    epoch_s = train(net, clean_dm, args.epochs, args.seed)
    clean_ba = accuracy(net, clean_dm.test_clean)
    print(f"clean: BA {clean_ba:.4f}, {epoch_s:.1f} s/epoch", flush=True)

    rows = []
    for name in names:
        attack = build_attack(name)
        record: Dict[str, float] = {}
        timed_fit(attack, record)
        rate = args.rate if args.rate is not None else max(float(getattr(attack, "default_rate", 0.1)), args.min_rate)
        t0 = time.perf_counter()
        try:
            dm = make_dm(attack, rate, args)
        except Exception as e:
            print(f"{name}: could not build its data ({type(e).__name__}: {e})", flush=True)
            rows.append((name, rate, None, None, None, None, None, None, None))
            continue
        net = make_net(args.seed)
        epoch_s = train(net, dm, args.epochs, args.seed)
        ba, asr = accuracy(net, dm.test_clean), accuracy(net, dm.test_poisoned)
        ratio = throughput_ratio(clean_dm, dm, args)
        ts = dm.train_set
        fit = record.get("fit") if getattr(attack, "requires_fit", False) else None
        rows.append((name, rate, len(ts.poison_indices), len(ts.cover_indices), fit, ba, asr, clean_ba - ba, ratio))
        print(f"{name}: rate {rate:g}, BA {ba:.4f}, ASR {asr:.4f}, {epoch_s:.1f} s/epoch, throughput x{ratio:.3f} "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)

    print()
    print(f"MNIST-5k (4,000 training / 1,000 test digits), ResNet-20 (width 16), {args.epochs} epochs, "
          f"batch {args.batch_size}, target 0, seed {args.seed}, {args.threads} thread(s); clean BA {clean_ba:.4f}; "
          f"total {time.perf_counter() - start_all:.0f} s")
    print()
    print("| attack | rate | poisoned | cover | fit time (s) | BA | ASR | BA drop vs clean | poisoned/clean throughput |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    print(f"| (clean) | 0 | 0 | 0 | - | {clean_ba:.4f} | - | - | 1 |")
    for name, rate, n_p, n_c, fit, ba, asr, drop, ratio in rows:
        if ba is None:
            print(f"| {name} | {rate:g} | - | - | - | failed | - | - | - |")
            continue
        fit_s = "-" if fit is None else f"{fit:.1f}"
        print(f"| {name} | {rate:g} | {n_p} | {n_c} | {fit_s} | {ba:.4f} | {asr:.4f} | {drop * 100:+.2f} pt | "
              f"{ratio:.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
