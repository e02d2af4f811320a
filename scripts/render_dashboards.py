"""Render what W&B shows for the project's runs, from offline run folders alone (no W&B server).

Reads the offline runs written by ``DetectionCallback`` / the matrix (``wandb/offline-run-*`` folders) with
``lightning_backdoor.wandb_utils.read_offline_run`` and the table files they reference, and draws the
panels ``docs/dashboards.md`` describes, as PNG files:

- ``roc_overlay_<det>.png``: the ``test/<det>/roc_curve`` line charts of several runs on one plot (what a
  W&B workspace shows when the runs are selected together);
- ``scores_<det>.png``: the ``scores_benign`` / ``scores_poisoned`` histograms of each run;
- ``history.png``: ``val/ba`` and ``val/asr`` against the step, per run;
- ``matrix_table.png`` and ``matrix_heatmap.png``: the matrix summary run's ``matrix/auroc`` table and heatmap.

    python scripts/render_dashboards.py --matrix matrix/mnist5k --out docs/img/dashboards
    python scripts/render_dashboards.py --runs path/to/wandb/offline-run-* --out /tmp/panels
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path
from typing import Dict, List

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from lightning_backdoor.wandb_utils import read_offline_run  # noqa: E402


def load_runs(paths: List[Path]) -> List[Dict]:
    runs = []
    for p in paths:
        data = read_offline_run(p, wait=10)
        data["dir"] = p
        data["name"] = str((data.get("config") or {}).get("_wandb_name", "")) or p.name
        runs.append(data)
    return runs


def table(run: Dict, key: str):
    path = run["summary"].get(f"{key}/path")
    if not path:
        return None
    return json.loads((Path(run["dir"]) / "files" / path).read_text())


def run_label(run: Dict) -> str:
    name = Path(run["dir"]).parent.parent.name  # cells/<key>/wandb/offline-run-*
    return name if name not in ("", "wandb") else Path(run["dir"]).name


def roc_overlays(runs: List[Dict], out: Path) -> List[Path]:
    dets = sorted({k.split("/")[1] for r in runs for k in r["summary"] if k.endswith("/roc_curve_table/path")})
    written = []
    for det in dets:
        fig, ax = plt.subplots(figsize=(5, 4.2), dpi=100)
        for r in runs:
            t = table(r, f"test/{det}/roc_curve_table")
            if t is None:
                continue
            pts = np.array(t["data"], dtype=float)
            auroc = r["summary"].get(f"test/{det}/auroc")
            ax.plot(pts[:, 0], pts[:, 1], lw=1.8, label=f"{run_label(r)}" + (f" (AUROC {auroc:.3f})" if auroc else ""))
        ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=1)
        ax.set_xlabel("fpr")
        ax.set_ylabel("tpr")
        ax.set_title(f"test/{det}/roc_curve — runs overlaid", fontsize=9)
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = out / f"roc_overlay_{det}.png"
        fig.savefig(path)
        plt.close(fig)
        written.append(path)
    return written


def histograms(runs: List[Dict], out: Path) -> List[Path]:
    dets = sorted({k.split("/")[1] for r in runs for k in r["summary"] if k.endswith("/scores_benign/bins")})
    written = []
    for det in dets:
        # runs that logged this detector's histograms (a failed or stopped cell has none)
        with_det = [r for r in runs if r["summary"].get(f"test/{det}/scores_benign/bins")]
        cols = min(5, len(with_det))  # a grid, not one row: a matrix has a dozen cells and more
        rows = -(-len(with_det) // cols)
        fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.8 * rows), dpi=100, squeeze=False)
        for ax in axes.flat[len(with_det):]:
            ax.axis("off")
        for ax, r in zip(axes.flat, with_det):
            for part, color in (("benign", "tab:blue"), ("poisoned", "tab:orange")):
                bins = r["summary"].get(f"test/{det}/scores_{part}/bins")
                vals = r["summary"].get(f"test/{det}/scores_{part}/values")
                if bins and vals:
                    ax.stairs(vals, bins, fill=True, alpha=0.55, color=color, label=part)
            ax.set_title(run_label(r), fontsize=8)
            ax.legend(fontsize=7)
        fig.suptitle(f"test/{det}/scores_benign, scores_poisoned (wandb.Histogram)", fontsize=9)
        fig.tight_layout()
        path = out / f"scores_{det}.png"
        fig.savefig(path)
        plt.close(fig)
        written.append(path)
    return written


def history(runs: List[Dict], out: Path) -> List[Path]:
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2), dpi=100)
    drawn = False
    for key, ax in zip(("val/ba", "val/asr"), axes):
        for r in runs:
            pts = [(row.get("trainer/global_step", row.get("_step")), row[key]) for row in r["history"] if key in row]
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, marker="o", ms=3, label=run_label(r))
                drawn = True
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("trainer/global_step")
        ax.legend(fontsize=7)
    fig.tight_layout()
    path = out / "history.png"
    if drawn:
        fig.savefig(path)
    plt.close(fig)
    return [path] if drawn else []


def matrix_panels(summary_run: Dict, out: Path) -> List[Path]:
    written = []
    t = table(summary_run, "matrix/auroc")
    if t is not None:
        cols, rows = t["columns"], t["data"]
        fig, ax = plt.subplots(figsize=(1.3 * len(cols) + 1, 0.4 * len(rows) + 1.2), dpi=100)
        ax.axis("off")
        cell_text = [[row[0]] + ["—" if v is None else f"{v:.3f}" for v in row[1:]] for row in rows]
        tab = ax.table(cellText=cell_text, colLabels=cols, loc="center")
        tab.auto_set_font_size(False)
        tab.set_fontsize(8)
        ax.set_title("matrix/auroc (wandb.Table)", fontsize=9)
        fig.tight_layout()
        path = out / "matrix_table.png"
        fig.savefig(path)
        plt.close(fig)
        written.append(path)
    img = summary_run["summary"].get("matrix/heatmap/path")
    if img:
        path = out / "matrix_heatmap.png"
        shutil.copy(Path(summary_run["dir"]) / "files" / img, path)
        written.append(path)
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--matrix", type=Path, help="a matrix output folder (cells/*/wandb and the summary run)")
    parser.add_argument("--runs", type=Path, nargs="*", default=[], help="offline run folders")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    run_dirs = list(args.runs)
    summary_run = None
    if args.matrix:
        run_dirs += sorted(args.matrix.glob("cells/*/wandb/offline-run-*"))
        meta = json.loads((args.matrix / "matrix.json").read_text())
        if meta.get("wandb_summary_run"):
            summary_run = load_runs([Path(meta["wandb_summary_run"])])[0]
    runs = load_runs(run_dirs)
    written = roc_overlays(runs, args.out) + histograms(runs, args.out) + history(runs, args.out)
    if summary_run is not None:
        written += matrix_panels(summary_run, args.out)
    for p in written:
        print(p)


if __name__ == "__main__":
    main()
