"""The matrix's overhead and its parallel scaling, measured side by side in one run.

1. The same small grid (``--attacks`` × ``--seeds`` cells of the embedded-data cell config cut to
   ``--epochs`` epochs and a few detectors) runs sequentially; its wall time is compared with the sum
   of the cells' own run times: the matrix's overhead. The first cell is then also run alone, as its own
   ``lightning-backdoor fit --config <cell>/config.yaml`` process (interpreter start and imports included),
   next to its time inside the matrix.
2. The grid runs again on a local Ray instance with 1 and with 2 workers (1 thread per cell); the
   speed-up of 2 workers over 1 is reported as a fraction of linear (2x).

Every run starts from empty output folders (no resume). On 2 CPU cores the default (4 cells, 2 epochs)
takes about 10 minutes; numbers from a loaded machine are lower bounds on the scaling.

    python benchmarks/bench_matrix.py [--epochs 2] [--seeds 0 1] [--out /tmp/bench_matrix]
"""

from __future__ import annotations

import argparse
import copy
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

from lightning_backdoor.matrix import parse_matrix_config, run_matrix

ROOT = Path(__file__).resolve().parents[1]
ATTACKS = {
    "badnets": {"data.init_args.attack": {"class_path": "lightning_backdoor.attacks.BadNets"}},
    "blended": {"data.init_args.attack": {"class_path": "lightning_backdoor.attacks.Blended"}},
    "wanet": {"data.init_args.attack": {"class_path": "lightning_backdoor.attacks.WaNet"}},
}


def cell_config(epochs: int) -> dict:
    cell = yaml.safe_load((ROOT / "configs" / "matrix" / "cell_mnist5k.yaml").read_text())
    cell["trainer"]["max_epochs"] = epochs
    cell["model"]["init_args"]["scheduler"]["init_args"]["T_max"] = epochs
    det = cell["trainer"]["callbacks"][0]["init_args"]
    det["detectors"] = [{"class_path": "lightning_backdoor.detectors.ScaleUp", "init_args": {"mode": "data_limited"}},
                        {"class_path": "lightning_backdoor.detectors.IBDPSC"},
                        {"class_path": "lightning_backdoor.detectors.Strip", "init_args": {"n": 10}}]
    det["max_samples"] = 100
    return cell


def run(out: Path, cell: dict, attacks, seeds, **executor) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    cfg = parse_matrix_config({"name": "bench", "cell": copy.deepcopy(cell), "attacks": attacks, "seeds": seeds,
                               "executor": executor, "out_dir": str(out),
                               "wandb": {"project": "lightning-backdoor", "offline": True, "summary": False}})
    start = time.perf_counter()
    report = run_matrix(cfg, resume=False, report=True, log=lambda *_: None)
    report["total_s"] = time.perf_counter() - start
    assert not report["failed"], report["failed"]
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--attacks", nargs="+", default=["badnets", "blended"], choices=sorted(ATTACKS))
    parser.add_argument("--out", type=Path, default=Path("/tmp/bench_matrix"))
    parser.add_argument("--skip-ray", action="store_true")
    args = parser.parse_args()
    attacks = {k: ATTACKS[k] for k in args.attacks}
    cell = cell_config(args.epochs)
    n_cells = len(attacks) * len(args.seeds)
    print(f"{n_cells} cells ({list(attacks)} x seeds {args.seeds}), {args.epochs} epochs each", flush=True)

    seq = run(args.out / "sequential", cell, attacks, args.seeds, kind="sequential", cpus_per_cell=1)
    cell_sum = sum(r["wall_s"] for r in seq["results"])
    rows = [("sequential", seq["total_s"], cell_sum)]
    first = seq["results"][0]
    alone_dir = args.out / "alone"
    shutil.rmtree(alone_dir, ignore_errors=True)
    alone_dir.mkdir(parents=True)
    exe = Path(sys.executable).parent / "lightning-backdoor"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "lightning_backdoor.cli"]
    start = time.perf_counter()
    subprocess.run(cmd + ["fit", "--config", str(args.out / "sequential" / "cells" / first["key"] / "config.yaml"),
                          "--trainer.default_root_dir", str(alone_dir),
                          "--trainer.logger.init_args.save_dir", str(alone_dir)],
                   cwd=alone_dir, check=True, capture_output=True,
                   env={**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"})  # 1 thread, as in the matrix
    alone_s = time.perf_counter() - start
    if not args.skip_ray:
        for workers in (1, 2):
            rep = run(args.out / f"ray{workers}", cell, attacks, args.seeds, kind="ray", workers=workers,
                      cpus_per_cell=1)
            rows.append((f"ray, {workers} worker{'s' if workers > 1 else ''}", rep["total_s"],
                         sum(r["wall_s"] for r in rep["results"])))
    print("\n| run | matrix wall s | sum of cells s | wall / sum of cells |")
    print("|---|---|---|---|")
    for name, total, cells in rows:
        print(f"| {name} | {total:.1f} | {cells:.1f} | {total / cells:.3f} |")
    print(f"\nmatrix overhead (sequential): {seq['total_s'] - cell_sum:.1f} s over {n_cells} cells "
          f"({(seq['total_s'] / cell_sum - 1) * 100:.1f} % of the cells' own time: config building, resume checks, "
          "report, heatmap)")
    print(f"cell {first['key']}: {first['wall_s']:.1f} s inside the matrix, {alone_s:.1f} s run alone as its own "
          f"`lightning-backdoor fit` process ({alone_s / first['wall_s']:.3f}x)")
    if not args.skip_ray:
        one, two = rows[1][1], rows[2][1]
        print(f"ray 1 -> 2 workers: speed-up {one / two:.2f}x = {one / two / 2 * 100:.0f} % of linear")


if __name__ == "__main__":
    main()
