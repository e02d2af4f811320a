"""IBD-PSC cost: shared-prefix runner vs n full amplified forward passes (CPU-friendly, < 1 min).

For each model and k, scores the same random CIFAR-shaped batch both ways, checks the scores
agree, and prints the time per image of each, their ratio (goal: shared <= 0.7x straightforward)
and IBD-PSC's cost relative to one plain forward pass (docs/methods.md §7, "detection cost").

    python benchmarks/bench_ibd_psc.py                      # ResNet-18 (width 64) and ResNet-20, k=1
    python benchmarks/bench_ibd_psc.py --batch-size 64 --repeats 5 --k 1 4 8
"""

from __future__ import annotations

import argparse
import time
from typing import Callable, List, Tuple

import torch
from torch import nn

from lightning_backdoor.detectors.functional.ibd_psc import (
    amplification_runner,
    amplified_layer_counts,
    bn_layers,
    ibd_psc_score,
)


def build_models(width: int) -> List[Tuple[str, nn.Module]]:
    try:
        from lightning_backdoor.models import create_model, list_models
    except ImportError:  # models package not available: torchvision's ImageNet-style ResNet-18
        import torchvision

        return [("torchvision resnet18", torchvision.models.resnet18(num_classes=10))]
    models = [(f"resnet18 (width {width})", create_model("resnet18", num_classes=10, width=width))]
    if "resnet20" in list_models():
        models.append(("resnet20", create_model("resnet20", num_classes=10)))
    return models


def timed(fn: Callable[[], object], repeats: int) -> Tuple[float, object]:
    """Best wall time of ``repeats`` calls after one warm-up call, and the warm-up's result."""
    out = fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2, help="timed calls after one warm-up (best is reported)")
    parser.add_argument("--width", type=int, default=64, help="ResNet-18 base width (64 = the standard model)")
    parser.add_argument("--k", type=int, nargs="+", default=[1])
    parser.add_argument("--n", type=int, default=5)
    parser.add_argument("--omega", type=float, default=1.5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads, 0 = torch's default (1 is steadier on a shared machine)")
    args = parser.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    torch.manual_seed(args.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    x = torch.rand(args.batch_size, 3, 32, 32, device=device)
    print(f"device={device} threads={torch.get_num_threads()} batch={args.batch_size} repeats={args.repeats} "
          f"n={args.n} omega={args.omega}")
    header = f"{'model':<22}{'k':>3}{'L':>4}{'plain ms/img':>14}{'straight ms/img':>17}{'shared ms/img':>15}" \
             f"{'shared/straight':>17}{'IBD-PSC/plain':>15}{'max |diff|':>12}"
    print(header)
    for name, model in build_models(args.width):
        model = model.to(device).eval()
        layers = bn_layers(model, x)
        with torch.no_grad():
            plain, _ = timed(lambda: (model(x), sync()), args.repeats + 1)
            for k in args.k:
                counts = amplified_layer_counts(k, args.n, len(layers))
                first = layers[len(layers) - counts[-1]]
                runner = amplification_runner(model, layers, first, example=x, omega=args.omega)
                assert runner is not None, f"{name} could not be split"
                kw = dict(omega=args.omega, n=args.n, layers=layers)
                shared, a = timed(lambda: ibd_psc_score(model, x, k, runner=runner, **kw).cpu(), args.repeats)
                straight, b = timed(lambda: ibd_psc_score(model, x, k, shared_prefix=False, **kw).cpu(), args.repeats)
                diff = float((a - b).abs().max())
                assert diff <= 1e-5, f"shared-prefix scores differ from the straightforward ones by {diff}"
                per = 1000 / len(x)
                print(f"{name:<22}{k:>3}{len(layers):>4}{plain * per:>14.2f}{straight * per:>17.2f}{shared * per:>15.2f}"
                      f"{shared / straight:>16.2f}x{shared / plain:>14.2f}x{diff:>12.1e}")


if __name__ == "__main__":
    main()
