"""Cost of one certified bound on MNIST-1-7 (ε = 0.1), and how it scales with n and d.

One ``certify`` call = Algorithm 1 (``--steps`` iterations of: clean loss and gradient over ``n``
points, the exact worst feasible point of each class, a dual-averaging step) plus the retraining on
``D_c`` and the candidate attack (``--retrain-steps`` accelerated projected-gradient steps). Both
parts are timed separately (``Certificate.timings``), median of ``--repeats`` runs, for
``n`` ∈ {400, 800} clean training points (a stratified seeded subset of the 800 embedded 1s and 7s)
and ``d`` ∈ {196, 784} features (14×14 average-pooled pixels vs the raw 28×28), side by side with
the ratio to the smallest setting. Both parts are ``O(steps · n · d)``. Prints a Markdown table;
about 2 minutes on 2 CPU cores (one thread) with the defaults.

    python benchmarks/bench_certified.py
    python benchmarks/bench_certified.py --steps 8000 --repeats 3
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lightning_backdoor.certified import certify, feasible_set  # noqa: E402
from lightning_backdoor.data import load_mnist5k  # noqa: E402
from lightning_backdoor.data.poisoned import stratified_split  # noqa: E402


def mnist17(pool: bool):
    images, labels = load_mnist5k()
    keep = (labels == 1) | (labels == 7)
    x = images[keep].double() / 255.0
    if pool:
        x = F.avg_pool2d(x, 2)
    y = (labels[keep] == 7).long()
    _, train = stratified_split(y, [len(y) // 5], 0)  # the same 80 % as scripts/certified_mnist17.py
    return x.flatten(1)[train], y[train]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epsilon", type=float, default=0.1)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--retrain-steps", type=int, default=1500)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for pool in (True, False):
        x_all, y_all = mnist17(pool)
        for n in (400, 800):
            sub = stratified_split(y_all, [n], 1)[0] if n < len(y_all) else torch.arange(len(y_all))
            x, y = x_all[sub], y_all[sub]
            fs = feasible_set(x, y, 70)
            bound, attack, value = [], [], None
            for _ in range(args.repeats):
                c = certify(x, y, fs, args.epsilon, rho=math.sqrt(0.8), eta=0.1, steps=args.steps,
                            retrain_steps=args.retrain_steps)
                bound.append(c.timings["bound_s"])
                attack.append(c.timings["attack_s"])
                value = (c.upper_bound, c.lower_bound)
            rows.append({"n": len(x), "d": x.shape[1], "bound_s": statistics.median(bound),
                         "attack_s": statistics.median(attack), "U*": value[0], "attack": value[1]})
            print(f"n={len(x)} d={x.shape[1]}: bound {rows[-1]['bound_s']:.2f}s attack {rows[-1]['attack_s']:.2f}s",
                  flush=True)
    base = rows[0]
    print(f"\nMNIST-1-7, ε = {args.epsilon}, {args.steps} + {args.retrain_steps} steps, {torch.get_num_threads()} "
          f"thread(s), median of {args.repeats}\n")
    print("| n | d | bound (Algorithm 1) s | ms / step | × smallest | retrain with attack s | × smallest | U* | attack loss |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['n']} | {r['d']} | {r['bound_s']:.2f} | {1000 * r['bound_s'] / args.steps:.2f} | "
              f"{r['bound_s'] / base['bound_s']:.2f} | {r['attack_s']:.2f} | {r['attack_s'] / base['attack_s']:.2f} | "
              f"{r['U*']:.4f} | {r['attack']:.4f} |")


if __name__ == "__main__":
    main()
