"""Every detector: its cost per image relative to a plain forward pass, and how well it detects (docs/methods.md §7).

    python benchmarks/bench_detectors.py                       # all three parts (~25-35 min on 2 CPU cores)
    python benchmarks/bench_detectors.py --skip-detection      # costs only (a few minutes)
    python benchmarks/bench_detectors.py --badnets-ckpt m1.ckpt --blended-ckpt m2.ckpt   # reuse / save models

1. **Cost table.** ``lightning_backdoor.models.create_model("resnet18", width=16)`` on CIFAR-shaped
   3x32x32 input, eval mode, CUDA when available, 1 CPU thread unless ``--threads`` says otherwise.
   Each entry is run ``--repeats`` times alternately with a plain forward of the same images (after
   a warm-up of both); its cost is the **median** of the per-pair ratios (robust to load from other
   processes on a shared machine); printed next to the detector's ideal cost in
   forwards (SCALE-UP ``1 + |S|``, ShrinkPad ``1 + n``, DeepSweep ``1 + copies``, TeCo ``1 + 15 * 5``
   plus the corruptions, STRIP ``n``, IBD-PSC ``1 + n`` before its shared prefix, BaDExpert 3).
   SCALE-UP goal: <= 1.05x its ideal. (All parts run with ``--threads`` torch threads, default 1.)
2. **SCALE-UP in the callback.** ``DetectionCallback([ScaleUp(mode="data_limited")])`` on the
   embedded MNIST digits with the quickstart's ResNet-20 and evaluation batches of 500: the logged
   ``test/scale_up/relative_cost`` over ``--callback-repeats`` runs (median), against the ideal 6.
3. **Detection table.** The quickstart's BadNets model and a Blended model (alpha 0.2, noise pattern),
   both ResNet-20 on the embedded digits (trained here for ``--epochs`` with the quickstart's
   optimiser, or loaded from ``--badnets-ckpt`` / ``--blended-ckpt`` when the file exists, saved there
   otherwise), each evaluated once by one ``DetectionCallback`` holding all eight detectors on the same
   ``--samples`` benign + ``--samples`` poisoned test images (fitted on the data module's held-apart
   benign split, ``--fit-samples``): AUROC, F1 at the detector's threshold, TPR at 5 % FPR, and each
   detector's ``relative_cost`` in that run. Numbers are findings, whatever they say.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch
from torch import nn

from lightning_backdoor.detectors import (
    IBDPSC,
    BaDExpert,
    DeepSweep,
    Frequency,
    ScaleUp,
    ShrinkPad,
    Strip,
    TeCo,
)
from lightning_backdoor.detectors.functional.teco import TECO_CORRUPTIONS, torch_corrupt

DETECTOR_NAMES = ("scale_up", "ibd_psc", "strip", "teco", "shrink_pad", "deep_sweep", "frequency", "badexpert")


def build_model() -> tuple[nn.Module, str]:
    from lightning_backdoor.models import create_model

    return create_model("resnet18", width=16), "lightning_backdoor resnet18(width=16)"


def _once(fn: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def timed(fn: Callable[[], object], repeats: int, device: torch.device) -> float:
    """Median wall time of ``fn`` over ``repeats`` runs after one warm-up run."""
    fn()
    return statistics.median(_once(fn, device) for _ in range(repeats))


def timed_vs(fn: Callable[[], object], reference: Callable[[], object], repeats: int,
             device: torch.device) -> tuple[float, float]:
    """``(median time of fn, median of the ratios time(fn) / time(reference))`` with the two run alternately
    ``repeats`` times after a warm-up of each, so that load from other processes on a shared machine
    hits both alike."""
    fn()
    reference()
    times, ratios = [], []
    for _ in range(repeats):
        t_ref = _once(reference, device)
        t = _once(fn, device)
        times.append(t)
        ratios.append(t / t_ref)
    return statistics.median(times), statistics.median(ratios)


def cost_table(args: argparse.Namespace) -> None:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, model_name = build_model()
    model = model.to(device).eval()
    g = torch.Generator().manual_seed(0)
    x = torch.rand(args.batch_size, 3, 32, 32, generator=g).to(device)
    benign = (torch.rand(64, 3, 32, 32, generator=g).to(device), torch.arange(64, device=device) % 10)

    def plain_time(inputs: torch.Tensor) -> float:
        def run() -> None:
            with torch.no_grad():
                model(inputs)
        return timed(run, args.repeats, device) / len(inputs)

    print(f"model: {model_name}; device: {device}; threads: {torch.get_num_threads()}; "
          f"median of {args.repeats} runs after a warm-up")
    with warnings.catch_warnings():  # random benign data leaves classes out of the fits: expected here
        warnings.simplefilter("ignore")
        su_limited = ScaleUp(mode="data_limited", threshold=0.0).fit(model, benign)
        frequency = Frequency(epochs=2).fit(model, benign)
        badexpert = BaDExpert(expert_epochs=1, aux_epochs=1, threshold=0.0).fit(model, benign)
    small = x[: args.small_batch_size]
    tb = torch.rand(args.teco_batch_size, 3, 32, 32, generator=g).to(device)
    teco = TeCo()
    sp, ds = ShrinkPad(), DeepSweep()
    # (name, detector, inputs, ideal forwards, extra kwargs)
    entries = [
        ("ScaleUp data_free |S|=5", ScaleUp(), x, 6.0),
        ("ScaleUp data_limited |S|=5", su_limited, x, 6.0),
        ("ScaleUp stacked, batch_size=4096", ScaleUp(batch_size=4096), x, 6.0),
        ("IBD-PSC k=1 n=5", IBDPSC(k=1), x, 6.0),
        ("Strip n=20", Strip(n=20, threshold=0.0, pool_size=64).fit(model, benign), small, 20.0),
        ("Strip n=100", Strip(n=100, threshold=0.0, pool_size=64).fit(model, benign), small, 100.0),
        (f"ShrinkPad n={sp.n}", sp, x, 1.0 + sp.n),
        (f"DeepSweep {ds.num_variants} copies", ds, x, 1.0 + ds.num_variants),
        ("TeCo 15x5 (torch backend)", teco, tb, 1.0 + teco.num_variants),
        ("TeCo 15x5 (reference)", TeCo(backend="reference"), tb, 1.0 + teco.num_variants),
        ("Frequency", frequency, x, float("nan")),
        ("BaDExpert", badexpert, x, 3.0),
    ]
    plain_big, plain_small = plain_time(x), plain_time(small)
    print(f"plain forward: {plain_big * 1e3:.3f} ms/image at batch {len(x)}, {plain_small * 1e3:.3f} ms/image at "
          f"batch {len(small)} (ratios below are to a plain forward at each entry's own batch size)")

    def plain_of(inputs: torch.Tensor) -> Callable[[], None]:
        def run() -> None:
            with torch.no_grad():
                model(inputs)
        return run

    # TeCo's corruptions alone, per image (what its ideal adds to the 76 forwards)
    def corrupt_all(backend: str) -> Callable[[], None]:
        from lightning_backdoor.detectors.functional.teco import reference_corrupt

        fn = torch_corrupt if backend == "torch" else reference_corrupt
        return lambda: [fn(tb, c, s, list(range(len(tb)))) for c in TECO_CORRUPTIONS for s in range(1, 6)]

    corr = {b: timed_vs(corrupt_all(b), plain_of(tb), args.teco_repeats, device) for b in ("torch", "reference")}
    print()
    print(f"| {'detector':<30} | {'ms/image':>9} | {'x plain fwd':>11} | {'ideal fwds':>10} | {'vs ideal':>8} |")
    print(f"|{'-' * 32}|{'-' * 11}|{'-' * 13}|{'-' * 12}|{'-' * 10}|")
    for name, det, inputs, ideal in entries:
        repeats = args.teco_repeats if isinstance(det, TeCo) else args.repeats
        t, ratio = timed_vs(lambda: det.score(model, inputs), plain_of(inputs), repeats, device)
        t /= len(inputs)
        ideal_s = "—" if ideal != ideal else f"{ideal:.0f}"
        vs = "—" if ideal != ideal else f"{ratio / ideal:.2f}x"
        print(f"| {name:<30} | {t * 1e3:>9.3f} | {ratio:>11.2f} | {ideal_s:>10} | {vs:>8} |", flush=True)
    for backend in ("torch", "reference"):
        t, extra = corr[backend]
        print(f"TeCo corruptions alone ({backend}): {t / len(tb) * 1e3:.2f} ms/image = {extra:.1f} plain forwards; "
              f"ideal incl. corruptions = {1 + teco.num_variants + extra:.1f} forwards")
    print("SCALE-UP goal: 'vs ideal' <= 1.05x.  Frequency runs its own small CNN on the spectrum (no model forward).")


# -- parts 2 and 3: the quickstart's setting -------------------------------------------------------
def quickstart_net() -> nn.Module:
    from lightning_backdoor.models import CifarResNet

    return CifarResNet(num_blocks=[3, 3, 3], width=16, num_classes=10, in_channels=1, mean=[0.1307], std=[0.3081])


def make_dm(attack_name: str, batch_size: int = 128):
    from lightning_backdoor import BackdoorDataModule
    from lightning_backdoor.attacks import BadNets, Blended

    attack = BadNets(patch_size=3, location="bottom_right", seed=0) if attack_name == "badnets" else Blended(
        alpha=0.2, seed=0)
    return BackdoorDataModule("mnist5k", attack=attack, target=0, rate=0.1, seed=0, batch_size=batch_size,
                              eval_batch_size=500)


def trainer(max_epochs: int, callbacks: Sequence = ()):
    import lightning as L

    return L.Trainer(max_epochs=max_epochs, accelerator="auto", devices=1, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                     num_sanity_val_steps=0, callbacks=list(callbacks))


def trained_module(attack_name: str, ckpt: Optional[Path], epochs: int):
    import lightning as L

    from lightning_backdoor import BackdoorClassifier
    from lightning_backdoor.checkpoints import load_net_weights

    net = quickstart_net()
    if ckpt is not None and ckpt.exists():
        load_net_weights(net, ckpt)
        print(f"{attack_name}: weights from {ckpt}", flush=True)
        return BackdoorClassifier(net)
    L.seed_everything(0, workers=True, verbose=False)
    module = BackdoorClassifier(
        net, optimizer=lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=5e-4, nesterov=True),
        scheduler=lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=epochs))
    t = trainer(epochs)
    start = time.perf_counter()
    t.fit(module, make_dm(attack_name))
    print(f"{attack_name}: trained {epochs} epochs in {time.perf_counter() - start:.0f}s", flush=True)
    if ckpt is not None:
        ckpt.parent.mkdir(parents=True, exist_ok=True)
        t.save_checkpoint(ckpt, weights_only=True)
    return module


def run_callback(module, dm, detectors: List, samples: int, fit_samples: int) -> Dict[str, float]:
    from lightning_backdoor.callbacks import DetectionCallback

    cb = DetectionCallback(detectors, stages=["test"], max_samples=samples, fit_samples=fit_samples, plots=False,
                           progress=False)
    t = trainer(1, callbacks=[cb])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t.test(module, dm, verbose=False)
    return {k: float(v) for k, v in t.callback_metrics.items()}


def all_detectors() -> List:
    return [ScaleUp(mode="data_limited"), IBDPSC(), Strip(n=100), TeCo(), ShrinkPad(), DeepSweep(), Frequency(),
            BaDExpert()]


def fmt(v: Optional[float]) -> str:
    return "—" if v is None or v != v else f"{v:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=64, help="images per call for the plain forward and most detectors")
    parser.add_argument("--small-batch-size", type=int, default=8, help="images per call for STRIP")
    parser.add_argument("--teco-batch-size", type=int, default=32, help="images per call for TeCo")
    parser.add_argument("--teco-repeats", type=int, default=3, help="timed runs of TeCo (median reported)")
    parser.add_argument("--repeats", type=int, default=7, help="timed runs per entry (median reported)")
    parser.add_argument("--callback-repeats", type=int, default=5, help="callback runs for SCALE-UP's relative_cost")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (0 = torch's choice)")
    parser.add_argument("--epochs", type=int, default=10, help="training epochs of the two models (quickstart: 10)")
    parser.add_argument("--samples", type=int, default=300, help="benign and poisoned test images per detection run")
    parser.add_argument("--fit-samples", type=int, default=200, help="benign fitting samples for the detectors")
    parser.add_argument("--badnets-ckpt", type=Path, default=Path("bench_detectors/badnets.ckpt"))
    parser.add_argument("--blended-ckpt", type=Path, default=Path("bench_detectors/blended.ckpt"))
    parser.add_argument("--skip-costs", action="store_true")
    parser.add_argument("--skip-callback", action="store_true")
    parser.add_argument("--skip-detection", action="store_true")
    args = parser.parse_args()
    for name in ("batch_size", "small_batch_size", "teco_batch_size", "teco_repeats", "repeats", "callback_repeats", "epochs", "samples", "fit_samples"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.threads > 0:  # all parts: on a shared CPU, two threads per process thrash under load
        torch.set_num_threads(args.threads)

    if not args.skip_costs:
        print("## 1. Cost per image relative to a plain forward pass\n", flush=True)
        cost_table(args)

    modules = {}
    if not (args.skip_callback and args.skip_detection):
        for attack, ckpt in (("badnets", args.badnets_ckpt), ("blended", args.blended_ckpt)):
            modules[attack] = trained_module(attack, ckpt, args.epochs)

    if not args.skip_callback:
        print(f"\n## 2. SCALE-UP relative_cost in DetectionCallback (median of {args.callback_repeats} runs)\n")
        costs = [run_callback(modules["badnets"], make_dm("badnets"), [ScaleUp(mode="data_limited")], 500,
                              args.fit_samples)["test/scale_up/relative_cost"] for _ in range(args.callback_repeats)]
        med = statistics.median(costs)
        print(f"runs: {', '.join(f'{c:.2f}' for c in costs)}; median {med:.2f} (ideal 6) = {med / 6:.3f}x the ideal "
              "(goal <= 1.05x)", flush=True)

    if not args.skip_detection:
        print(f"\n## 3. Detection on the embedded MNIST digits ({args.samples} benign + {args.samples} poisoned test "
              f"images, {args.fit_samples} benign fitting samples; ResNet-20, {args.epochs} epochs)\n", flush=True)
        rows = []
        for attack, module in modules.items():
            start = time.perf_counter()
            res = run_callback(module, make_dm(attack), all_detectors(), args.samples, args.fit_samples)
            print(f"{attack}: BA {res.get('test/ba', float('nan')):.3f}, ASR {res.get('test/asr', float('nan')):.3f}; "
                  f"detection run {time.perf_counter() - start:.0f}s", flush=True)
            for det in DETECTOR_NAMES:
                rows.append((attack, det, res.get(f"test/{det}/auroc"), res.get(f"test/{det}/f1"),
                             res.get(f"test/{det}/tpr@fpr5"), res.get(f"test/{det}/relative_cost")))
        print()
        print("| attack | detector | AUROC | F1 | TPR@FPR5 | relative_cost |")
        print("|---|---|---|---|---|---|")
        for attack, det, auroc, f1, tpr, cost in rows:
            print(f"| {attack} | {det} | {fmt(auroc)} | {fmt(f1)} | {fmt(tpr)} | {fmt(cost)} |")
        print("\n(— = not computed: the detector could not be fitted, see the warnings above)")


if __name__ == "__main__":
    main()
