"""Backdoors meet sanitisation: sphere and slab against the BadNets, Blended and WaNet training sets.

On the embedded MNIST-5k digits with the quickstart's data settings (rate 0.1, target 0, seed 0) and
ResNet-20 (``--epochs`` epochs each, SGD 0.05 with a cosine schedule; every model from the same seed):

1. trains a **clean** ResNet-20 on the clean training split (the same samples, no attack) — the
   feature space "of a clean model" (an oracle one: it saw the clean version of the training set);
2. per attack, trains on the unsanitised poisoned set (the baseline), then for each sanitiser —
   sphere and slab in oracle mode (fitted on the data module's 200 held-apart clean samples,
   radii at the 70th percentile), in pixel space and in the clean model's penultimate space
   (64-d) — removes the flagged samples and retrains from scratch on what is kept;
3. reports removal precision/recall, AUROC of the sanitiser's score, clean samples lost, and BA/ASR
   on the test split after retraining; a second table gives the removal numbers of the same
   sanitisers in data-dependent mode (centroids from the poisoned training set; no retraining).

Prints both Markdown tables, writes them into docs/sanitizers.md (between the ``sanitize-table``
markers; ``--no-docs`` to skip) and logs them as ``wandb.Table``s to an offline W&B run under
``--out``. The numbers are findings, whatever they are. 16 trainings of 5 epochs (the default; the
configs/sanitize pair's setting — at 3 epochs the unsanitised BadNets model had not learnt the backdoor
yet, ASR 0.37): about 6 minutes on 2 idle CPU cores (1,240 ResNet-20 batches at 0.25 s); measured 34 minutes
on this shared 2-core machine under a load of 9-13 (one thread). ``--quick`` is a
1-epoch smoke run on BadNets only.

    python benchmarks/bench_sanitize.py
    python benchmarks/bench_sanitize.py --quick --no-docs
"""

from __future__ import annotations

import argparse
import re
import sys
import time
import warnings
from pathlib import Path
from typing import Callable, Dict, List, Optional

import lightning as L
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lightning_backdoor import BackdoorClassifier, BackdoorDataModule  # noqa: E402
from lightning_backdoor.attacks import BadNets, Blended, WaNet  # noqa: E402
from lightning_backdoor.models import CifarResNet  # noqa: E402
from lightning_backdoor.sanitizers import ModelFeatures, PixelFeatures, Slab, Sphere, extract_features  # noqa: E402
from lightning_backdoor.sanitizers.functional import removal_metrics  # noqa: E402

DOC = ROOT / "docs" / "sanitizers.md"
START, END = "<!-- sanitize-table:start -->", "<!-- sanitize-table:end -->"
ATTACKS: Dict[str, Callable] = {
    "BadNets": lambda: BadNets(patch_size=3, location="bottom_right", seed=0),
    "Blended": lambda: Blended(alpha=0.2, seed=0),
    "WaNet": lambda: WaNet(k=4, s=0.5, cross_ratio=2.0, seed=0),
}


def quickstart_net() -> CifarResNet:
    return CifarResNet(num_blocks=[3, 3, 3], width=16, num_classes=10, in_channels=1, mean=[0.1307], std=[0.3081])


def make_dm(attack, sanitizer=None, batch_size: int = 128) -> BackdoorDataModule:
    return BackdoorDataModule("mnist5k", attack=attack, target=0, rate=0.1, seed=0, defense_size=200,
                              batch_size=batch_size, eval_batch_size=500, sanitizer=sanitizer)


def train(dm: BackdoorDataModule, epochs: int, seed: int) -> Dict[str, float]:
    """Fit a fresh ResNet-20 on ``dm`` and test it; returns test/ba, test/asr (when poisoned) and seconds."""
    L.seed_everything(seed, workers=True, verbose=False)
    module = BackdoorClassifier(quickstart_net(), optimizer=lambda p: torch.optim.SGD(
        p, lr=0.05, momentum=0.9, weight_decay=5e-4, nesterov=True),
        scheduler=lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=epochs))
    trainer = L.Trainer(max_epochs=epochs, accelerator="auto", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        num_sanity_val_steps=0)
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, dm)
        trainer.test(module, dm, verbose=False)
    out = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("test/")}
    out["seconds"] = time.perf_counter() - start
    out["net"] = module.net
    return out


def fmt(v: Optional[float], digits: int = 3) -> str:
    return "—" if v is None or v != v else f"{v:.{digits}f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=5, help="training epochs of every model")
    parser.add_argument("--percentile", type=float, default=70.0, help="sphere/slab radius percentile")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (0 = torch's default; on a shared, loaded machine 1 is fastest)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("bench_sanitize"), help="output folder (W&B run)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 epoch, BadNets only")
    parser.add_argument("--no-docs", action="store_true", help="do not write the tables into docs/sanitizers.md")
    args = parser.parse_args()
    if args.quick:
        args.epochs = 1
    if args.epochs < 1:
        parser.error("--epochs must be >= 1")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    attacks = {"BadNets": ATTACKS["BadNets"]} if args.quick else ATTACKS
    started = time.perf_counter()
    print(f"threads={torch.get_num_threads()} epochs={args.epochs} percentile={args.percentile}", flush=True)

    clean = train(make_dm(None), args.epochs, args.seed)
    clean_net = clean.pop("net").eval()
    print(f"clean model: BA {clean['test/ba']:.3f} ({clean['seconds']:.0f}s)", flush=True)
    spaces = {"pixels": lambda: PixelFeatures(), "clean-model features": lambda: ModelFeatures(clean_net)}
    sanitizers = {"sphere": Sphere, "slab": Slab}

    rows: List[Dict] = []
    removal_rows: List[Dict] = []
    for attack_name, make_attack in attacks.items():
        base_dm = make_dm(make_attack())
        base_dm.setup("fit")
        # data-dependent mode: removal numbers only, on features computed once per space
        for space, make_features in spaces.items():
            feats = extract_features(base_dm.train_set, make_features(), batch_size=500)
            for san_name, cls in sanitizers.items():
                keep, scores = cls(mode="data", percentile=args.percentile).sanitize(feats.features, feats.labels,
                                                                                    num_classes=10)
                m = removal_metrics(~keep, scores, feats.poisoned)
                removal_rows.append({"attack": attack_name, "sanitiser": san_name, "space": space, "mode": "data", **m})
        base = train(base_dm, args.epochs, args.seed)
        base.pop("net")
        rows.append({"attack": attack_name, "sanitiser": "none", "space": "—", "removed": 0, "clean_removed": 0,
                     "precision": None, "recall": None, "auroc": None, "ba": base["test/ba"], "asr": base["test/asr"],
                     "seconds": base["seconds"]})
        print(f"{attack_name} unsanitised: BA {base['test/ba']:.3f} ASR {base['test/asr']:.3f}", flush=True)
        for san_name, cls in sanitizers.items():
            for space, make_features in spaces.items():
                dm = make_dm(make_attack(), cls(mode="oracle", percentile=args.percentile, features=make_features()))
                dm.setup("fit")
                m = dm.sanitization.metrics
                row = {"attack": attack_name, "sanitiser": san_name, "space": space, "mode": "oracle",
                       "removed": m["removed"], "clean_removed": m["clean_removed"], "precision": m["precision"],
                       "recall": m["recall"], "auroc": m["auroc"], "kept": len(dm.train_set),
                       "poisoned": int(len(dm.train_set.poison_indices))}
                res = train(dm, args.epochs, args.seed)
                res.pop("net")
                row.update(ba=res["test/ba"], asr=res["test/asr"], seconds=res["seconds"])
                rows.append(row)
                print(f"{attack_name} {san_name}/{space}: removed {m['removed']} ({m['clean_removed']} clean), "
                      f"precision {m['precision']:.3f} recall {m['recall']:.3f} AUROC {m['auroc']:.3f} -> "
                      f"BA {res['test/ba']:.3f} ASR {res['test/asr']:.3f} ({res['seconds']:.0f}s)", flush=True)
    elapsed = time.perf_counter() - started
    n_poisoned = rows[1].get("poisoned") if len(rows) > 1 else None

    cols = ["attack", "sanitiser (oracle)", "feature space", "removed", "clean lost", "precision", "recall", "AUROC",
            "BA", "ASR"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append(f"| {r['attack']} | {r['sanitiser']} | {r['space']} | {r['removed']} | {r['clean_removed']} | "
                     f"{fmt(r['precision'])} | {fmt(r['recall'])} | {fmt(r['auroc'])} | {fmt(r['ba'])} | {fmt(r['asr'])} |")
    table = "\n".join(lines)
    cols2 = ["attack", "sanitiser (data-dependent)", "feature space", "removed", "clean lost", "precision", "recall",
             "AUROC"]
    lines = ["| " + " | ".join(cols2) + " |", "|" + "---|" * len(cols2)]
    for r in removal_rows:
        lines.append(f"| {r['attack']} | {r['sanitiser']} | {r['space']} | {r['removed']} | {r['clean_removed']} | "
                     f"{fmt(r['precision'])} | {fmt(r['recall'])} | {fmt(r['auroc'])} |")
    table2 = "\n".join(lines)
    header = (f"Clean ResNet-20 (the feature model): test BA {clean['test/ba']:.3f}. {n_poisoned} of the "
              f"{rows[1].get('kept', 0) + rows[1].get('removed', 0)} training samples are poisoned (rate 0.1); "
              f"{args.epochs} epochs per model; BA/ASR on the test split.")
    print("\n" + header + "\n\n" + table + "\n\nRemoval only, data-dependent mode:\n\n" + table2)
    print(f"\n(total {elapsed / 60:.1f} min)")

    if not args.no_docs:
        stamp = (f"Generated by `python benchmarks/bench_sanitize.py` ({args.epochs} epochs, percentile "
                 f"{args.percentile:g}; {elapsed / 60:.0f} min on this machine). {header}")
        block = f"{START}\n{stamp}\n\n{table}\n\nRemoval only, data-dependent mode (no retraining):\n\n{table2}\n{END}"
        text, count = re.subn(re.escape(START) + ".*?" + re.escape(END), lambda _: block, DOC.read_text(), flags=re.S)
        if count != 1:
            raise SystemExit(f"{DOC} must contain the markers {START} ... {END} once")
        DOC.write_text(text)
        print(f"wrote {DOC.relative_to(ROOT)}")

    import wandb

    args.out.mkdir(parents=True, exist_ok=True)
    run = wandb.init(project="lightning-backdoor", name="bench-sanitize", mode="offline", dir=str(args.out),
                     config={"epochs": args.epochs, "percentile": args.percentile, "clean_ba": clean["test/ba"]})
    keys = sorted({k for r in rows for k in r})
    run.log({"sanitize_benchmark": wandb.Table(columns=keys, data=[[r.get(k) for k in keys] for r in rows])})
    keys2 = sorted({k for r in removal_rows for k in r})
    run.log({"sanitize_removal_data_dependent": wandb.Table(columns=keys2,
                                                            data=[[r.get(k) for k in keys2] for r in removal_rows])})
    run_dir = run.dir.rsplit("/files", 1)[0]
    run.finish()
    print(f"W&B offline run: {run_dir}  (upload with: wandb sync {run_dir})")


if __name__ == "__main__":
    main()
