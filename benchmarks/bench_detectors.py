"""Detection cost per image relative to one plain forward pass (docs/methods.md §7).

    python benchmarks/bench_detectors.py [--batch-size 64] [--strip-batch-size 4] [--repeats 3]

Model: ``lightning_backdoor.models.create_model("resnet18", width=16)`` on CIFAR-shaped 3x32x32
input (falls back to ``torchvision.models.resnet18(num_classes=10)``), in eval mode, on CUDA when
available, with 1 CPU thread unless ``--threads`` says otherwise. Each timing is the best of ``--repeats`` runs after one warm-up run. For SCALE-UP
the ratio is also compared to its ideal ``1 + |S|`` forward passes (goal: within 1.15x).
"""

from __future__ import annotations

import argparse
import time
import warnings
from typing import Callable

import torch
from torch import nn

from lightning_backdoor.detectors import ScaleUp, Strip


def build_model() -> tuple[nn.Module, str]:
    try:
        from lightning_backdoor.models import create_model

        return create_model("resnet18", width=16), "lightning_backdoor resnet18(width=16)"
    except Exception as err:  # the models package may not exist yet
        import torchvision

        return torchvision.models.resnet18(num_classes=10), f"torchvision resnet18 ({type(err).__name__})"


def timed(fn: Callable[[], object], repeats: int, device: torch.device) -> float:
    """Best (minimum) wall time of ``fn`` over ``repeats`` runs after a warm-up run: the least
    disturbed by other load on a shared machine, as in ``timeit``."""
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=64, help="images per call for the plain forward and SCALE-UP")
    parser.add_argument("--strip-batch-size", type=int, default=4, help="images per call for STRIP (n forwards each)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per entry (best reported)")
    parser.add_argument(
        "--threads", type=int, default=1,
        help="torch CPU threads (default 1: stable ratios on a shared CPU; 0 = torch's choice)",
    )
    args = parser.parse_args()
    for name in ("batch_size", "strip_batch_size", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, model_name = build_model()
    model = model.to(device).eval()
    g = torch.Generator().manual_seed(0)
    x = torch.rand(args.batch_size, 3, 32, 32, generator=g).to(device)
    xs = x[: args.strip_batch_size]
    benign = (torch.rand(64, 3, 32, 32, generator=g).to(device), torch.arange(64, device=device) % 10)

    def plain() -> None:
        with torch.no_grad():
            model(x)

    t_plain = timed(plain, args.repeats, device) / len(x)
    print(f"model: {model_name}; device: {device}; threads: {torch.get_num_threads()}; "
          f"plain forward: {t_plain * 1e3:.3f} ms/image at batch {len(x)}")

    entries = []
    scale_up = ScaleUp()
    entries.append(("ScaleUp data_free |S|=5", scale_up, x, 1 + len(scale_up.scales)))
    with warnings.catch_warnings():  # random benign data leaves classes out of the fit: expected here
        warnings.simplefilter("ignore")
        su_limited = ScaleUp(mode="data_limited", threshold=0.0).fit(model, benign)
    entries.append(("ScaleUp data_limited |S|=5", su_limited, x, 1 + len(su_limited.scales)))
    for n in (20, 100):
        strip = Strip(n=n, threshold=0.0, pool_size=64).fit(model, benign)
        entries.append((f"Strip n={n}", strip, xs, n))

    print()
    print(f"| {'detector':<28} | {'ms/image':>9} | {'x plain fwd':>11} | {'ideal':>5} | {'vs ideal':>8} |")
    print(f"|{'-' * 30}|{'-' * 11}|{'-' * 13}|{'-' * 7}|{'-' * 10}|")
    for name, det, inputs, ideal in entries:
        t = timed(lambda: det.score(model, inputs), args.repeats, device) / len(inputs)
        ratio = t / t_plain
        print(f"| {name:<28} | {t * 1e3:>9.3f} | {ratio:>11.2f} | {ideal:>5} | {ratio / ideal:>7.2f}x |")
    print("\nSCALE-UP goal: 'vs ideal' <= 1.15x (cost ~ (1+|S|) plain forwards).")


if __name__ == "__main__":
    main()
