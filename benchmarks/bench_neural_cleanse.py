"""Neural Cleanse on the embedded MNIST digits: detection, mask overlap, pruning, unlearning, batched speed-up.

    python benchmarks/bench_neural_cleanse.py                        # trains 4 models here (see --epochs)
    python benchmarks/bench_neural_cleanse.py --ckpt-dir bench_nc/   # reuse / save the trained models

1. **Models.** The quickstart's ResNet-20 (``--width``, default 16) on the embedded digits: a clean model
   and BadNets (3x3 noise patch, bottom right), Blended (alpha 0.2, noise pattern) and WaNet models, all
   target 0, rate 0.1, trained for ``--epochs`` with the quickstart's optimiser (or loaded from
   ``--ckpt-dir/<name>.pt`` when the file exists; saved there otherwise). BA / ASR on ``--eval`` test images.
2. **Detection.** ``NeuralCleanse(steps=--steps, batch_size=--batch-size)`` on ``--samples`` images of
   the data module's held-apart clean split: the largest small-side anomaly index, the flagged labels
   (paper: index > 2), the target's mask norm against the median, whether the target is flagged;
   for BadNets the overlap of the target's reversed mask with the true 3x3 patch region
   (``mass_in_trigger``: share of the mask's L1 mass inside the patch; ``iou_topk``: IoU of its 9
   largest pixels with the patch).
3. **Mitigation (BadNets model).** Pruning the penultimate features (``NeuralCleanse.prune``, 5% of them a
   step) until the reversed trigger's ASR < 0.1: BA / ASR on the test images after each step (first and last
   printed); unlearning: ``configs/neural_cleanse_unlearn.yaml``'s recipe (DefenseFinetuneDataModule, 400
   clean images, 20% stamped with the reversed trigger, SGD lr 0.005) for ``--unlearn-epochs`` (5, as the config): BA / ASR.
4. **Speed.** The batched-over-labels run against the per-label loop at equal steps (``--timing-steps``,
   early stopping off), on the BadNets model, both ``--repeats`` times alternately; the median ratio.

Goals from the issue: the clean model is not flagged; the BadNets model is flagged on the true target;
unlearning brings ASR below 0.1 with a BA drop <= 2 points. Numbers are findings, whatever they say.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
import warnings
from pathlib import Path
from typing import Dict, Optional

import torch
from torch import nn


def quickstart_net(width: int) -> nn.Module:
    from lightning_backdoor.models import CifarResNet

    return CifarResNet(num_blocks=[3, 3, 3], width=width, num_classes=10, in_channels=1, mean=[0.1307], std=[0.3081])


def make_attack(name: str):
    from lightning_backdoor.attacks import BadNets, Blended, WaNet

    if name == "clean":
        return None
    if name == "badnets":
        return BadNets(patch_size=3, location="bottom_right", seed=0)
    if name == "blended":
        return Blended(alpha=0.2, seed=0)
    return WaNet(seed=0)


def make_dm(name: str, batch_size: int = 128, cls=None, **kw):
    from lightning_backdoor import BackdoorDataModule

    cls = cls or BackdoorDataModule
    return cls("mnist5k", attack=make_attack(name), target=0, rate=0.1, seed=0, batch_size=batch_size,
               eval_batch_size=500, **kw)


def trainer(max_epochs: int, **kw):
    import lightning as L

    args = dict(max_epochs=max_epochs, accelerator="auto", devices=1, logger=False, enable_checkpointing=False,
                enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0)
    args.update(kw)
    return L.Trainer(**args)


def trained_net(name: str, ckpt_dir: Optional[Path], epochs: int, width: int) -> nn.Module:
    import lightning as L

    from lightning_backdoor import BackdoorClassifier
    from lightning_backdoor.checkpoints import load_net_weights

    net = quickstart_net(width)
    path = ckpt_dir / f"{name}.pt" if ckpt_dir is not None else None
    if path is not None and path.exists():
        load_net_weights(net, path)
        print(f"{name}: weights from {path}", flush=True)
        return net.eval()
    L.seed_everything(0, workers=True, verbose=False)
    module = BackdoorClassifier(
        net, optimizer=lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=5e-4, nesterov=True),
        scheduler=lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=epochs))
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer(epochs).fit(module, make_dm(name))
    print(f"{name}: trained {epochs} epochs in {time.perf_counter() - start:.0f}s", flush=True)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(net.state_dict(), path)
    return net.eval()


def eval_sets(name: str, n: int):
    """``(x_clean, y_clean, x_poisoned, y_true_poisoned)``: seeded random test images (never the first n)."""
    from lightning_backdoor.utils import random_subset

    dm = make_dm("badnets" if name == "clean" else name)
    dm.setup()
    pc, pp = random_subset(len(dm.test_clean), n, 0), random_subset(len(dm.test_poisoned), n, 0)
    xc = torch.stack([dm.test_clean[i].x for i in pc.tolist()])
    yc = torch.tensor([dm.test_clean[i].y for i in pc.tolist()])
    xp = torch.stack([dm.test_poisoned[i].x for i in pp.tolist()])
    yp = torch.tensor([dm.test_poisoned[i].original_y for i in pp.tolist()])
    return xc, yc, xp, yp


def clean_share(name: str, n: int):
    from lightning_backdoor.detectors import collect_benign

    dm = make_dm(name)
    dm.setup()
    return collect_benign(dm.defense_dataloader(), max_samples=n, seed=0)


def ba_asr(net: nn.Module, sets, target: int = 0) -> Dict[str, float]:
    from lightning_backdoor.defenses.functional import accuracy

    xc, yc, xp, yp = sets
    keep = yp != target
    return {"ba": accuracy(net, xc, yc), "asr": accuracy(net, xp[keep], torch.full_like(yp[keep], target))}


def true_region(attack) -> torch.Tensor:
    """Pixels the attack changes on an all-zero or all-one image: the trigger's footprint ``[H, W]``."""
    zeros, ones = torch.zeros(1, 1, 28, 28), torch.ones(1, 1, 28, 28)
    attack.build(1, 28, 28)
    changed = (attack.apply_trigger(zeros) != zeros) | (attack.apply_trigger(ones) != ones)
    return changed[0].any(dim=0).float()


def unlearn(net: nn.Module, nc, epochs: int, lr: float = 0.005, batch_size: int = 32) -> nn.Module:
    """configs/neural_cleanse_unlearn.yaml's recipe on a copy of ``net``, reusing the fitted ``nc``."""
    from lightning_backdoor import BackdoorClassifier
    from lightning_backdoor.data import DefenseFinetuneDataModule
    from lightning_backdoor.losses import NeuralCleanseUnlearning

    work = copy.deepcopy(net)
    term = NeuralCleanseUnlearning(cleanse=nc, stamp_rate=0.2, seed=0, refit=False)
    module = BackdoorClassifier(work, optimizer=lambda p: torch.optim.SGD(p, lr=lr, momentum=0.9, weight_decay=5e-4),
                                losses=[term])
    dm = make_dm("badnets", batch_size=batch_size, cls=DefenseFinetuneDataModule, defense_size=400)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer(epochs, gradient_clip_val=5.0).fit(module, dm)
    return work.eval()


def timing(net: nn.Module, x: torch.Tensor, steps: int, batch_size: int, repeats: int) -> Dict[str, float]:
    from lightning_backdoor.defenses.functional import reverse_engineer

    def run(batched: bool) -> float:
        start = time.perf_counter()
        reverse_engineer(net, x, steps=steps, batch_size=batch_size, early_stop_patience=10 ** 9, batched=batched,
                         generator=torch.Generator().manual_seed(0))
        return time.perf_counter() - start

    run(True)  # warm-up
    pairs = [(run(True), run(False)) for _ in range(repeats)]
    return {"batched": statistics.median(a for a, _ in pairs), "per_label": statistics.median(b for _, b in pairs),
            "speedup": statistics.median(b / a for a, b in pairs)}


def fmt(v, digits: int = 3) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return "—" if v != v else f"{v:.{digits}f}"
    return str(v)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt-dir", type=Path, default=None)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--samples", type=int, default=200)
    ap.add_argument("--eval", type=int, default=500)
    ap.add_argument("--unlearn-epochs", type=int, default=5)  # configs/neural_cleanse_unlearn.yaml
    ap.add_argument("--unlearn-lr", type=float, default=0.005)  # configs/neural_cleanse_unlearn.yaml
    ap.add_argument("--timing-steps", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--models", default="clean,badnets,blended,wanet")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from lightning_backdoor.defenses import NeuralCleanse

    t0 = time.perf_counter()
    rows, nets, fitted = [], {}, {}
    for name in args.models.split(","):
        net = trained_net(name, args.ckpt_dir, args.epochs, args.width)
        nets[name] = net
        sets = eval_sets(name, args.eval)
        perf = ba_asr(net, sets)
        x, y = clean_share(name, args.samples)
        start = time.perf_counter()
        nc = NeuralCleanse(steps=args.steps, batch_size=args.batch_size, max_samples=args.samples).fit(net, (x, y))
        secs = time.perf_counter() - start
        fitted[name] = nc
        l1 = nc.l1
        row = {"model": name, "ba": perf["ba"], "asr": perf["asr"] if name != "clean" else None,
               "anomaly": nc.max_anomaly(), "flagged": nc.flagged, "l1_target": float(l1[0]),
               "l1_median": float(l1.median()), "target_flagged": 0 in nc.flagged, "secs": secs,
               "steps": int(nc.steps_run.max())}
        if name == "badnets":
            ov = nc.overlap(true_region(make_attack("badnets")))[0]
            row["overlap"] = f"{ov['mass_in_trigger']:.2f} / {ov['iou_topk']:.2f}"
        rows.append(row)
        print(f"{name}: {row}", flush=True)

    print("\n### Detection (Neural Cleanse, all labels batched)\n")
    print(f"ResNet-20 width {args.width}, {args.epochs} training epochs, {args.steps} steps x batch {args.batch_size}, "
          f"{args.samples} clean images; BA/ASR on {args.eval} test images.\n")
    print("| model | BA | ASR | max anomaly index | flagged labels | target flagged | L1 target / median | "
          "target mask in true patch (mass / IoU) | NC time (s) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {fmt(r['ba'])} | {fmt(r['asr'])} | {fmt(r['anomaly'], 2)} | {r['flagged'] or '—'} | "
              f"{'yes' if r['target_flagged'] else 'no'} | {r['l1_target']:.1f} / {r['l1_median']:.1f} | "
              f"{r.get('overlap', '—')} | {r['secs']:.0f} |")

    if "badnets" in nets:
        net, nc = nets["badnets"], fitted["badnets"]
        sets = eval_sets("badnets", args.eval)
        before = ba_asr(net, sets)
        x, y = clean_share("badnets", args.samples)
        xc, yc, xp, yp = sets
        _, hist = nc.prune(net, (x, y), eval_clean=(xc, yc), eval_poisoned=(xp, yp), target=0)
        start = time.perf_counter()
        unlearned = unlearn(net, nc, args.unlearn_epochs, args.unlearn_lr)
        secs = time.perf_counter() - start
        after = ba_asr(unlearned, sets)
        print("\n### Mitigation of the BadNets model (reversed trigger of label(s) "
              f"{nc.suspect_labels()})\n")
        print("| mitigation | BA | ASR | reversed-trigger ASR | notes |")
        print("|---|---|---|---|---|")
        print(f"| none | {fmt(before['ba'])} | {fmt(before['asr'])} | {fmt(hist[0]['reversed_asr'])} | |")
        n_feat = net.fc.in_features
        mid = hist[len(hist) // 2]
        if len(hist) > 2:
            print(f"| pruning, {int(mid['pruned'])} of {n_feat} features | {fmt(mid['ba'])} | {fmt(mid['asr'])} | "
                  f"{fmt(mid['reversed_asr'])} | intermediate step |")
        last = hist[-1]
        print(f"| pruning, {int(last['pruned'])} of {n_feat} features | {fmt(last['ba'])} | {fmt(last['asr'])} | "
              f"{fmt(last['reversed_asr'])} | {len(hist) - 1} steps of 5% until reversed ASR < 0.1 |")
        print(f"| unlearning, {args.unlearn_epochs} epochs (lr {args.unlearn_lr:g}) on 400 clean images (20% stamped) | {fmt(after['ba'])} | "
              f"{fmt(after['asr'])} | — | {secs:.0f}s; BA drop {100 * (before['ba'] - after['ba']):.1f} points |")

        x_t, _ = clean_share("badnets", 64)
        t = timing(net, x_t, args.timing_steps, args.batch_size, args.repeats)
        print(f"\n### Batched over labels vs per-label loop ({args.timing_steps} steps each, batch {args.batch_size}, "
              f"10 labels, early stop off, median of {args.repeats})\n")
        print("| batched (s) | per-label loop (s) | speed-up |")
        print("|---|---|---|")
        print(f"| {t['batched']:.2f} | {t['per_label']:.2f} | {t['speedup']:.2f}x |")
    print(f"\ntotal {time.perf_counter() - t0:.0f}s, {args.threads} thread(s)")


if __name__ == "__main__":
    main()
