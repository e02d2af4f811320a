"""Adaptive attacks vs the detectors they target: vanilla fine-tune vs SCALE-UP adaptive vs IBD-PSC Designs 1/2.

1. Trains a vanilla BadNets model on the embedded MNIST digits (the quickstart's data, attack and
   ResNet-20; ``--epochs``) and saves it as ``<out>/vanilla.ckpt``.
2. Fine-tunes it for ``--finetune-epochs`` with each objective, from the same weights (weights only,
   fresh SGD, same seed and data order): the vanilla objective, the SCALE-UP adaptive loss, IBD-PSC
   Design 1 with alpha in {0.2, 0.5, 0.9, 0.99}, Design 2 with alpha' in {0.01, 0.1, 0.5} (zeta 0.1).
3. Measures on the test split: BA, ASR, ASR under Gaussian input noise (sigma 0.05 ... 0.3), the AUROC
   of SCALE-UP (data-limited) and IBD-PSC on ``--samples`` benign + ``--samples`` poisoned images
   (DetectionCallback, fitted on the data module's held-apart benign set), and the training-step time
   of each objective relative to the vanilla step (median over ``--timing-steps`` interleaved steps on
   the same batch; goal for IBD-PSC adaptive: <= 2.2x).

Prints a Markdown table and logs it as a ``wandb.Table`` ("adaptive_benchmark") to an offline W&B
run under ``<out>/wandb``. The numbers are findings, whatever they are. On 2 CPU cores the default
run takes roughly 20-30 minutes; ``--quick`` is a smoke run of a few minutes.

    python benchmarks/bench_adaptive.py                          # 10 vanilla epochs, 3 fine-tune epochs
    python benchmarks/bench_adaptive.py --quick
    python benchmarks/bench_adaptive.py --vanilla-ckpt bench_adaptive/vanilla.ckpt --finetune-epochs 5
"""

from __future__ import annotations

import argparse
import json
import copy
import statistics
import time
import warnings
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import lightning as L
import torch
from torch import nn

from lightning_backdoor import BackdoorClassifier, BackdoorDataModule
from lightning_backdoor.attacks import BadNets
from lightning_backdoor.callbacks import DetectionCallback
from lightning_backdoor.detectors import IBDPSC, ScaleUp
from lightning_backdoor.losses import IBDPSCAdaptiveLoss, ScaleUpAdaptiveLoss
from lightning_backdoor.models import CifarResNet
from lightning_backdoor.modules.classifier import noise_key

NOISE = (0.05, 0.1, 0.2, 0.3)
Variant = Tuple[str, Callable[[], List[nn.Module]]]


def quickstart_net() -> CifarResNet:
    return CifarResNet(num_blocks=[3, 3, 3], width=16, num_classes=10, in_channels=1, mean=[0.1307], std=[0.3081])


def variants() -> List[Variant]:
    out: List[Variant] = [("vanilla fine-tune", lambda: []), ("SCALE-UP adaptive", lambda: [ScaleUpAdaptiveLoss()])]
    for a in (0.2, 0.5, 0.9, 0.99):
        out.append((f"IBD-PSC D1 α={a}", lambda a=a: [IBDPSCAdaptiveLoss(design=1, alpha=a)]))
    for a in (0.01, 0.1, 0.5):
        out.append((f"IBD-PSC D2 α'={a}", lambda a=a: [IBDPSCAdaptiveLoss(design=2, alpha=a)]))
    return out


def make_dm(batch_size: int) -> BackdoorDataModule:
    return BackdoorDataModule("mnist5k", attack=BadNets(patch_size=3, location="bottom_right", seed=0), target=0,
                              rate=0.1, seed=0, batch_size=batch_size, eval_batch_size=500)


def sgd(lr: float) -> Callable:
    return lambda params: torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=5e-4, nesterov=True)


def cosine(t_max: int) -> Callable:
    return lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=t_max)


def trainer(max_epochs: int, callbacks: Sequence = (), **kw) -> L.Trainer:
    return L.Trainer(max_epochs=max_epochs, accelerator="auto", devices=1, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                     num_sanity_val_steps=0, callbacks=list(callbacks), **kw)


def train_vanilla(path: Path, epochs: int, lr: float, batch_size: int, seed: int) -> None:
    L.seed_everything(seed, workers=True, verbose=False)
    module = BackdoorClassifier(quickstart_net(), optimizer=sgd(lr), scheduler=cosine(epochs))
    t = trainer(epochs)
    start = time.perf_counter()
    t.fit(module, make_dm(batch_size))
    t.save_checkpoint(path, weights_only=True)
    print(f"vanilla: {epochs} epochs in {time.perf_counter() - start:.0f}s -> {path}", flush=True)


def evaluate(module: BackdoorClassifier, dm: BackdoorDataModule, samples: int, fit_samples: int) -> Dict[str, float]:
    """test/ba, test/asr, test/asr@noise*, test/{scale_up,ibd_psc}/{auroc,k} on the test split."""
    det = DetectionCallback([ScaleUp(mode="data_limited"), IBDPSC()], stages=["test"], max_samples=samples,
                            fit_samples=fit_samples, plots=False, progress=False)
    t = trainer(1, callbacks=[det])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t.test(module, dm, verbose=False)
    return {k: float(v) for k, v in t.callback_metrics.items()}


def time_steps(modules: Dict[str, BackdoorClassifier], dm: BackdoorDataModule, steps: int, warmup: int,
               seed: int) -> Dict[str, float]:
    """Median seconds of one training step (forward, loss terms, backward, SGD step) per objective.

    Every objective runs on the same batch; steps are interleaved across objectives so that load
    from other processes on a shared machine hits all of them alike.
    """
    L.seed_everything(seed, verbose=False)
    batch = next(iter(dm.train_dataloader()))
    device = next(iter(modules.values())).device
    batch = [b.to(device) if isinstance(b, torch.Tensor) else b for b in batch]
    assert bool(batch[2].any()) and bool((~batch[2]).any()), "the timing batch needs benign and poisoned samples"
    opts = {name: torch.optim.SGD(m.parameters(), lr=1e-3, momentum=0.9) for name, m in modules.items()}
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    times: Dict[str, List[float]] = {name: [] for name in modules}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # self.log() without a Trainer
        for i in range(warmup + steps):
            for name, module in modules.items():
                module.train()
                sync()
                start = time.perf_counter()
                opts[name].zero_grad(set_to_none=True)
                module.training_step(batch, i).backward()
                # as in the fine-tuning (configs/adaptive/*.yaml): unclipped, the eval-mode objectives diverge to NaN
                torch.nn.utils.clip_grad_norm_(module.parameters(), 5.0)
                opts[name].step()
                sync()
                if i >= warmup:
                    times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def fmt(v: Optional[float], digits: int = 3) -> str:
    return "—" if v is None or v != v else f"{v:.{digits}f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=10, help="vanilla training epochs")
    parser.add_argument("--finetune-epochs", type=int, default=3, help="fine-tuning epochs (same for every objective)")
    parser.add_argument("--lr", type=float, default=0.05, help="vanilla SGD learning rate (cosine schedule)")
    parser.add_argument("--finetune-lr", type=float, default=0.01, help="fine-tuning SGD learning rate (cosine)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--samples", type=int, default=300, help="benign and poisoned test images for the AUROCs")
    parser.add_argument("--fit-samples", type=int, default=200, help="held-apart benign images for fitting detectors")
    parser.add_argument("--timing-steps", type=int, default=15, help="timed steps per objective (median reported)")
    parser.add_argument("--out", type=Path, default=Path("bench_adaptive"), help="output folder (checkpoint, W&B run)")
    parser.add_argument("--vanilla-ckpt", type=Path, default=None, help="reuse this vanilla checkpoint instead of training")
    parser.add_argument("--timing-only", action="store_true",
                        help="only the step times of the objectives (no fine-tuning or evaluation)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 3 + 1 epochs, 100 samples, 5 timed steps")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (0 = torch's default)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.quick:
        args.epochs, args.finetune_epochs, args.samples, args.timing_steps = 3, 1, 100, 5
    for name in ("epochs", "finetune_epochs", "batch_size", "samples", "fit_samples", "timing_steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"device={device} threads={torch.get_num_threads()} epochs={args.epochs} finetune_epochs={args.finetune_epochs} "
          f"samples={args.samples}+{args.samples}", flush=True)

    ckpt = args.vanilla_ckpt or args.out / "vanilla.ckpt"
    if args.vanilla_ckpt is None:
        train_vanilla(ckpt, args.epochs, args.lr, args.batch_size, args.seed)
    dm = make_dm(args.batch_size)

    rows: List[Dict[str, object]] = []
    args.out.mkdir(parents=True, exist_ok=True)

    def keep(row: Dict[str, object]) -> None:
        """Record a measured row at once (rows.json, and a line on stdout): a later crash loses nothing."""
        rows.append(row)
        (args.out / "rows.json").write_text(json.dumps(rows, indent=1, default=float))
        print("  " + ", ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()
                               if k in ("variant", "test/ba", "test/asr", "test/scale_up/auroc", "test/ibd_psc/auroc",
                                        "test/ibd_psc/k", "attack_k")), flush=True)

    start = time.perf_counter()
    if not args.timing_only:
        vanilla = BackdoorClassifier(quickstart_net(), noise_sigmas=NOISE, init_weights=str(ckpt))
        keep({"variant": "vanilla (no fine-tune)", "epochs": 0, **evaluate(vanilla, dm, args.samples, args.fit_samples)})
        print(f"vanilla (no fine-tune): evaluated in {time.perf_counter() - start:.0f}s", flush=True)

    timing_modules: Dict[str, BackdoorClassifier] = {}
    for label, losses in variants():
        if args.timing_only:  # the step times only: fresh terms (IBD-PSC's k fitted on the first step)
            timing = BackdoorClassifier(quickstart_net(), losses=losses(), init_weights=str(ckpt)).to(device)
            timing.setup("fit")
            timing.target = 0
            dm.setup("fit")
            for term in timing.loss_terms:
                if hasattr(term, "fit"):
                    term.fit(timing.logits_net, dm.defense_dataloader())
            timing_modules[label] = timing
            rows.append({"variant": label})
            continue
        L.seed_everything(args.seed, workers=True, verbose=False)
        module = BackdoorClassifier(quickstart_net(), optimizer=sgd(args.finetune_lr),
                                    scheduler=cosine(args.finetune_epochs), losses=losses(), noise_sigmas=NOISE,
                                    init_weights=str(ckpt))
        start = time.perf_counter()
        trainer(args.finetune_epochs, gradient_clip_val=5.0).fit(module, dm)  # as configs/adaptive/*.yaml
        fit_s = time.perf_counter() - start
        metrics = evaluate(module, dm, args.samples, args.fit_samples)
        attack_k = [getattr(term, "k", None) for term in module.loss_terms]
        skipped = sum(int(getattr(term, "skipped", 0)) for term in module.loss_terms)
        keep({"variant": label, "epochs": args.finetune_epochs, "attack_k": attack_k[0] if attack_k else None,
              "skipped": skipped, "fit_s": fit_s, **metrics})
        print(f"{label}: fine-tuned in {fit_s:.0f}s, evaluated in {time.perf_counter() - start - fit_s:.0f}s", flush=True)
        # timing copy: the same starting weights for every objective, terms fitted (k) as in training
        timing = BackdoorClassifier(quickstart_net(), losses=copy.deepcopy(list(module.loss_terms)),
                                    init_weights=str(ckpt)).to(device)
        timing.setup("fit")
        timing.target = 0
        timing_modules[label] = timing

    step = time_steps(timing_modules, dm, args.timing_steps, warmup=2, seed=args.seed)
    ref = step["vanilla fine-tune"]
    for row in rows:
        if row["variant"] in step:
            row["step_ms"] = step[row["variant"]] * 1e3
            row["step_rel"] = step[row["variant"]] / ref

    columns = ["variant", "BA", "ASR"] + [f"ASR@{s:g}" for s in NOISE] + \
              ["SCALE-UP AUROC", "IBD-PSC AUROC", "IBD-PSC k (det/att)", "step × vanilla"]
    table: List[List[object]] = []
    for r in rows:
        det_k = r.get("test/ibd_psc/k")
        k_text = f"{int(det_k) if det_k is not None else '—'}/{r['attack_k'] if r.get('attack_k') is not None else '—'}"
        table.append([r["variant"], r.get("test/ba"), r.get("test/asr")]
                     + [r.get(f"test/{noise_key(s)}") for s in NOISE]
                     + [r.get("test/scale_up/auroc"), r.get("test/ibd_psc/auroc"), k_text, r.get("step_rel")])

    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for t in table:
        cells = [t[0]] + [fmt(v) for v in t[1:-2]] + [t[-2], "—" if t[-1] is None else f"{t[-1]:.2f}×"]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    markdown = "\n".join(lines)
    notes = (f"\nmnist5k, BadNets 3x3 noise patch, rate 0.1, target 0; ResNet-20 (width 16). Vanilla: {args.epochs} "
             f"epochs SGD lr {args.lr}; every fine-tune: {args.finetune_epochs} epochs SGD lr {args.finetune_lr} from "
             f"the same weights. Test split: BA on 1000 clean, ASR on the non-target poisoned images; AUROCs on "
             f"{args.samples}+{args.samples}. Vanilla step: {ref * 1e3:.0f} ms/batch of {args.batch_size} on {device} "
             f"with {torch.get_num_threads()} threads (median of {args.timing_steps}).")
    print("\n" + markdown + notes)
    (args.out / "bench_adaptive.md").write_text(markdown + "\n" + notes + "\n")

    import wandb

    run = wandb.init(project="lightning-backdoor", name="bench-adaptive", mode="offline", dir=str(args.out),
                     config={k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()})
    wb_columns = ["variant", "ba", "asr"] + [noise_key(s) for s in NOISE] + \
                 ["scale_up_auroc", "ibd_psc_auroc", "ibd_psc_k_det_att", "step_time_rel"]
    wb_rows = [[None if isinstance(v, float) and v != v else v for v in t] for t in table]
    run.log({"adaptive_benchmark": wandb.Table(columns=wb_columns, data=wb_rows)})
    run_dir = Path(run.dir).parent
    run.finish()
    print(f"\nW&B offline run: {run_dir}  (upload with: wandb sync {run_dir})")


if __name__ == "__main__":
    main()
