"""Training-time and model-edit attacks on the embedded MNIST digits: IAD and SRA (BA, ASR, time).

    OMP_NUM_THREADS=1 python benchmarks/bench_attacks_training.py [--epochs 4] [--iad-epochs 5] [--out results.md]

- **clean**: the quickstart's ResNet-20 (SGD 0.05, Nesterov, cosine), no attack: the BA reference and the
  vanilla training step time.
- **IAD**: the same ResNet-20 and classifier schedule trained with IAD (BackdoorClassifier's batch-attack
  seam, two optimisers, one epoch of mask pre-training first, so the classifier trains as many epochs as the
  clean one); BA, ASR with the trained generator, wall time, and the training step time relative to a
  vanilla step: medians over the two fits, and side by side (interleaved plain-torch steps of both on the
  same batches, the optimiser steps included) so that a change of machine load does not bias the ratio.
- **SRA**: the clean ResNet-20 above and a clean VGG-11-BN (width / 4) edited with a 1-channel subnet and the
  3x3 BadNets noise patch as the trigger (slice position searched, the default; the paper's first channel for
  the ResNet too); BA before/after, ASR before/after, edit time.

Goals (issue 11): IAD ASR >= 0.9 with BA within 3 points of clean; SRA ASR >= 0.9 with a BA drop <= 2 points
on the ResNet-20 or the VGG-BN. The script reports whatever the numbers are.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import lightning as L
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightning_backdoor import BackdoorClassifier, BackdoorDataModule  # noqa: E402
from lightning_backdoor.attacks import IAD, SRA, BadNets, evaluate_ba_asr  # noqa: E402
from lightning_backdoor.models import create_model  # noqa: E402


class StepTimer(L.Callback):
    """Wall time of every training step (batch start to batch end), split by the batch attack's phase."""

    def __init__(self) -> None:
        self.times = {"pretrain": [], "train": []}
        self._t0, self._phase = 0.0, "train"

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        attack = getattr(pl_module, "batch_attack", None)
        self._phase = attack.phase() if attack is not None else "train"
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.times[self._phase].append(time.perf_counter() - self._t0)


def median(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2] if xs else float("nan")


def datamodule(attack=None):
    return BackdoorDataModule("mnist5k", attack=attack, target=0, rate=0.1, seed=0, batch_size=128,
                              eval_batch_size=500)


def classifier(arch: str, epochs: int) -> BackdoorClassifier:
    torch.manual_seed(0)
    if arch == "resnet20":
        net = create_model("resnet20", num_classes=10, in_channels=1, mean=[0.1307], std=[0.3081])
    else:
        net = create_model("vgg11_bn", num_classes=10, in_channels=1, mean=[0.1307], std=[0.3081], width_div=4)
    return BackdoorClassifier(
        net, optimizer=lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=5e-4, nesterov=True),
        scheduler=lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=epochs))


def fit(module, dm, epochs):
    timer = StepTimer()
    t = L.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                  enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                  check_val_every_n_epoch=epochs, callbacks=[timer])
    t0 = time.perf_counter()
    t.fit(module, dm)
    wall = time.perf_counter() - t0
    res = t.test(module, dm, verbose=False)
    metrics = {k: v for r in res for k, v in r.items()}
    return metrics, wall, timer


def test_tensors(dm):
    xs = torch.stack([dm.test_clean[i][0] for i in range(len(dm.test_clean))])
    ys = torch.tensor([int(dm.test_clean[i][1]) for i in range(len(dm.test_clean))])
    return xs, ys


def side_by_side(dm, trained_iad, batches=3, reps=4):
    """Median plain-torch training step time of a vanilla and an IAD ResNet-20 step, interleaved on the same batches."""
    import copy

    import torch.nn.functional as F

    loader = dm.train_dataloader()
    data = []
    for i, b in enumerate(loader):
        if i >= batches:
            break
        data.append((b[0], b[1]))
    torch.manual_seed(0)
    net_v = create_model("resnet20", num_classes=10, in_channels=1, mean=[0.1307], std=[0.3081])
    net_i = copy.deepcopy(net_v)
    attack = copy.deepcopy(trained_iad).train()
    opt_v = torch.optim.SGD(net_v.parameters(), lr=0.01, momentum=0.9)
    opt_i = torch.optim.SGD(net_i.parameters(), lr=0.01, momentum=0.9)
    opt_g = torch.optim.Adam(attack.pattern_generator.parameters(), lr=1e-4, betas=(0.5, 0.9))
    times = {"vanilla": [], "iad": []}
    for _ in range(reps):
        for x, y in data:
            t0 = time.perf_counter()
            opt_v.zero_grad()
            F.cross_entropy(net_v(x), y).backward()
            opt_v.step()
            times["vanilla"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            opt_i.zero_grad()
            opt_g.zero_grad()
            pb = attack.poison_batch(x, y, 0)
            loss = F.cross_entropy(net_i(pb.x), pb.y) + attack.attack_loss(x, y, pb)
            loss.backward()
            opt_i.step()
            opt_g.step()
            times["iad"].append(time.perf_counter() - t0)
    return {k: median(v) for k, v in times.items()}


def run_sra(net, dm, trigger, steps, channels="search"):
    xs, ys = test_tensors(dm)
    before = evaluate_ba_asr(net, xs, ys, trigger, 0)
    sra = SRA(trigger, width=1, steps=steps, channels=channels, seed=0)
    t0 = time.perf_counter()
    edited = sra.edit(net, dm.train_set.dataset, target=0)
    wall = time.perf_counter() - t0
    after = evaluate_ba_asr(edited, xs, ys, trigger, 0)
    return before, after, wall


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=4, help="epochs of the clean models (and classifier schedule)")
    p.add_argument("--iad-epochs", type=int, default=5, help="epochs of the IAD run (its first steps pre-train the mask)")
    p.add_argument("--mask-pretrain-steps", type=int, default=26, help="IAD mask pre-training steps (26 = one epoch)")
    p.add_argument("--sra-steps", type=int, default=150)
    p.add_argument("--out", default=None, help="also write the Markdown table here")
    args = p.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    L.seed_everything(0, verbose=False)
    rows = []

    # clean ResNet-20 (BA reference, vanilla step time)
    dm_clean = datamodule()
    clean = classifier("resnet20", args.epochs)
    m_clean, wall_clean, timer_clean = fit(clean, dm_clean, args.epochs)
    vanilla_step = median(timer_clean.times["train"])
    rows.append(("clean ResNet-20", f"{args.epochs} epochs", m_clean["test/ba"], None, wall_clean,
                 f"step {vanilla_step * 1000:.0f} ms (1.00x)"))

    # IAD on the same model and schedule
    L.seed_everything(0, verbose=False)
    iad = IAD(mask_pretrain_steps=args.mask_pretrain_steps, seed=0)
    dm_iad = datamodule(iad)
    mod_iad = classifier("resnet20", args.epochs)  # the schedule starts after the pre-training
    m_iad, wall_iad, timer_iad = fit(mod_iad, dm_iad, args.iad_epochs)
    iad_step, pre_step = median(timer_iad.times["train"]), median(timer_iad.times["pretrain"])
    side = side_by_side(dm_iad, iad)
    rows.append(("IAD ResNet-20", f"{args.iad_epochs} epochs ({args.mask_pretrain_steps} mask pre-training steps)",
                 m_iad["test/ba"], m_iad["test/asr"], wall_iad,
                 f"step {iad_step * 1000:.0f} ms ({iad_step / vanilla_step:.2f}x the clean fit's); side by side "
                 f"{side['iad'] * 1000:.0f} vs {side['vanilla'] * 1000:.0f} ms ({side['iad'] / side['vanilla']:.2f}x); "
                 f"pre-training step {pre_step * 1000:.0f} ms; BA {100 * (m_iad['test/ba'] - m_clean['test/ba']):+.1f} "
                 "points vs clean"))

    # SRA on the clean ResNet-20 and on a clean VGG-11-BN
    trigger = BadNets(patch_size=3, seed=0).build(1, 28, 28)
    for choice in ("search", "first"):
        before, after, wall = run_sra(clean.net, dm_clean, trigger, args.sra_steps, choice)
        rows.append((f"SRA ResNet-20 (clean model above), channels={choice}", f"width 1, {args.sra_steps} subnet steps",
                     after["ba"], after["asr"], wall, f"BA before {before['ba']:.4f} (drop "
                     f"{100 * (before['ba'] - after['ba']):.1f} points), ASR before {before['asr']:.4f}"))
    L.seed_everything(0, verbose=False)
    vgg = classifier("vgg11_bn", args.epochs)
    _, wall_vgg, _ = fit(vgg, dm_clean, args.epochs)
    before, after, wall = run_sra(vgg.net, dm_clean, trigger, args.sra_steps)
    rows.append(("SRA VGG-11-BN width/4", f"width 1, {args.sra_steps} subnet steps (clean fit {wall_vgg:.0f} s)",
                 after["ba"], after["asr"], wall, f"BA before {before['ba']:.4f} (drop "
                 f"{100 * (before['ba'] - after['ba']):.1f} points), ASR before {before['asr']:.4f}"))

    lines = ["| run | setting | BA | ASR | time (s) | notes |", "|---|---|---|---|---|---|"]
    for name, setting, ba, asr, wall, notes in rows:
        lines.append(f"| {name} | {setting} | {ba:.4f} | {'' if asr is None else f'{asr:.4f}'} | {wall:.1f} | {notes} |")
    table = "\n".join(lines)
    print("\nmnist5k (3,300 training digits, 1,000 test), torch threads:", torch.get_num_threads())
    print(table)
    if args.out:
        Path(args.out).write_text(table + "\n")


if __name__ == "__main__":
    main()
