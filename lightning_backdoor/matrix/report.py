"""The matrix's outputs: the papers' table (defence rows × attack columns), CSV/JSON, a heatmap, a W&B summary run.

Aggregation is over seeds: every metric of the cells of one ``(dataset, model, attack)`` column is
reported as ``mean ± std`` (sample standard deviation, ``n − 1``; a single seed shows the mean only),
with ``n`` the number of finished seeds. Failed cells are listed and left out of the numbers.

Files (under the matrix's output folder):

- ``matrix.md``: AUROC and F1 tables (detector × attack), BA/ASR per attack, the Neural Cleanse rows
  when that callback ran, the failed cells;
- ``cells.csv``: one row per (cell, metric) — the raw numbers; ``summary.csv``: one row per (column,
  metric) with ``mean``, ``std``, ``n``; ``matrix.json``: both, plus each cell's status and W&B run;
- ``heatmap.png``: mean AUROC, detectors × attacks.
"""

from __future__ import annotations

import csv
import json
import math
import statistics
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

Column = Tuple[Optional[str], Optional[str], str]  # (dataset, model, attack)


def column_of(result: Dict[str, Any]) -> Column:
    return result.get("dataset"), result.get("model"), result["attack"]


def column_name(col: Column) -> str:
    return "/".join(p for p in col if p)


def aggregate(results: Sequence[Dict[str, Any]]) -> Dict[Column, Dict[str, Dict[str, float]]]:
    """``{column: {metric: {"mean", "std", "n"}}}`` over the finished seeds of each column."""
    per: Dict[Column, Dict[str, List[float]]] = {}
    for r in results:
        if r.get("status") != "ok":
            continue
        bucket = per.setdefault(column_of(r), {})
        for k, v in r.get("metrics", {}).items():
            if isinstance(v, (int, float)) and math.isfinite(v):
                bucket.setdefault(k, []).append(float(v))
    out: Dict[Column, Dict[str, Dict[str, float]]] = {}
    for col, metrics in per.items():
        out[col] = {k: {"mean": statistics.fmean(v), "std": statistics.stdev(v) if len(v) > 1 else 0.0, "n": len(v)}
                    for k, v in metrics.items()}
    return out


def detectors_in(agg: Dict[Column, Dict[str, Dict[str, float]]]) -> List[str]:
    names = set()
    for metrics in agg.values():
        for k in metrics:
            parts = k.split("/")
            if len(parts) == 3 and parts[0] == "test" and parts[2] == "auroc":
                names.add(parts[1])
    return sorted(names)


def fmt(stat: Optional[Dict[str, float]], digits: int = 3) -> str:
    if not stat:
        return "—"
    if stat["n"] > 1:
        return f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}"
    return f"{stat['mean']:.{digits}f}"


def markdown(name: str, results: Sequence[Dict[str, Any]], agg: Dict[Column, Dict[str, Dict[str, float]]],
             columns: Sequence[Column]) -> str:
    heads = [column_name(c) for c in columns]
    lines = [f"# Attack × defence matrix: {name}", ""]
    n_ok = sum(r.get("status") == "ok" for r in results)
    lines.append(f"{n_ok} of {len(results)} cells finished; numbers are mean ± std over seeds (n − 1), "
                 "on the test split (`test/<detector>/<metric>`, all samples).")
    dets = detectors_in(agg)
    for metric, title in (("auroc", "AUROC"), ("f1", "F1 at the detector's threshold")):
        lines += ["", f"## {title}", "", "| detector | " + " | ".join(heads) + " |",
                  "|---|" + "|".join("---" for _ in heads) + "|"]
        for det in dets:
            cells = [fmt(agg.get(c, {}).get(f"test/{det}/{metric}")) for c in columns]
            lines.append(f"| {det} | " + " | ".join(cells) + " |")
    lines += ["", "## Attacked models", "", "| metric | " + " | ".join(heads) + " |",
              "|---|" + "|".join("---" for _ in heads) + "|"]
    for key, label in (("test/ba", "BA"), ("test/asr", "ASR")):
        lines.append(f"| {label} | " + " | ".join(fmt(agg.get(c, {}).get(key)) for c in columns) + " |")
    nc_keys = sorted({k for m in agg.values() for k in m if k.startswith("test/neural_cleanse/")
                      and k.count("/") == 2})
    if nc_keys:
        lines += ["", "## Neural Cleanse (model-level)", "", "| metric | " + " | ".join(heads) + " |",
                  "|---|" + "|".join("---" for _ in heads) + "|"]
        for key in nc_keys:
            lines.append(f"| {key.split('/', 2)[2]} | " + " | ".join(fmt(agg.get(c, {}).get(key)) for c in columns)
                         + " |")
    failed = [r for r in results if r.get("status") != "ok"]
    if failed:
        lines += ["", "## Failed cells", ""]
        for r in failed:
            last = (r.get("error") or "").strip().splitlines()[-1:] or ["(no error recorded)"]
            lines.append(f"- `{r['key']}`: {last[0]}")
    return "\n".join(lines) + "\n"


def write_csvs(out: Path, results: Sequence[Dict[str, Any]], agg: Dict[Column, Dict[str, Dict[str, float]]]) -> None:
    with open(out / "cells.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["cell", "dataset", "model", "attack", "seed", "status", "metric", "value"])
        for r in results:
            for k, v in sorted(r.get("metrics", {}).items()):
                w.writerow([r["key"], r.get("dataset") or "", r.get("model") or "", r["attack"], r["seed"],
                            r.get("status"), k, repr(float(v))])
    with open(out / "summary.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["dataset", "model", "attack", "metric", "mean", "std", "n"])
        for col, metrics in agg.items():
            for k, s in sorted(metrics.items()):
                w.writerow([col[0] or "", col[1] or "", col[2], k, repr(s["mean"]), repr(s["std"]), s["n"]])


def heatmap(path: Path, agg: Dict[Column, Dict[str, Dict[str, float]]], columns: Sequence[Column], title: str) -> bool:
    dets = detectors_in(agg)
    if not dets:
        return False
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    import numpy as np

    data = np.full((len(dets), len(columns)), np.nan)
    for i, det in enumerate(dets):
        for j, col in enumerate(columns):
            stat = agg.get(col, {}).get(f"test/{det}/auroc")
            if stat:
                data[i, j] = stat["mean"]
    fig, ax = plt.subplots(figsize=(1.1 * len(columns) + 2.5, 0.55 * len(dets) + 1.8), dpi=100)
    im = ax.imshow(data, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
    ax.set_xticks(range(len(columns)), [column_name(c) for c in columns], rotation=35, ha="right", fontsize=8)
    ax.set_yticks(range(len(dets)), dets, fontsize=8)
    for i in range(len(dets)):
        for j in range(len(columns)):
            if not np.isnan(data[i, j]):
                ax.text(j, i, f"{data[i, j]:.2f}", ha="center", va="center", fontsize=7)
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, label="AUROC")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def wandb_summary(out: Path, name: str, wandb_cfg: Dict[str, Any], results: Sequence[Dict[str, Any]],
                  agg: Dict[Column, Dict[str, Dict[str, float]]], columns: Sequence[Column],
                  heatmap_path: Optional[Path]) -> Optional[str]:
    """A W&B run ``matrix-<name>`` with the tables and the heatmap; returns its folder."""
    import wandb

    mode = "offline" if wandb_cfg.get("offline", True) else "online"
    run = wandb.init(project=wandb_cfg.get("project", "lightning-backdoor"), name=f"matrix-{name}", dir=str(out),
                     mode=mode, job_type="matrix", config={"matrix": name, "cells": len(results)}, reinit="create_new")
    try:
        heads = [column_name(c) for c in columns]
        dets = detectors_in(agg)
        payload: Dict[str, Any] = {}
        for metric in ("auroc", "f1"):
            rows = [[det] + [_mean(agg, c, f"test/{det}/{metric}") for c in columns] for det in dets]
            payload[f"matrix/{metric}"] = wandb.Table(columns=["detector"] + heads, data=rows)
        rows = []
        for r in results:
            m, w = r.get("metrics", {}), r.get("wandb") or {}
            rows.append([r["key"], r["attack"], r["seed"], r.get("status"), m.get("test/ba"), m.get("test/asr"),
                         w.get("id", ""), w.get("url") or w.get("dir", "")])
        payload["matrix/cells"] = wandb.Table(columns=["cell", "attack", "seed", "status", "ba", "asr", "run_id",
                                                       "run"], data=rows)
        if heatmap_path is not None and heatmap_path.is_file():
            payload["matrix/heatmap"] = wandb.Image(str(heatmap_path))
        run.log(payload)
        run_dir = str(Path(run.dir).parent)
    finally:
        run.finish()
    return run_dir


def _mean(agg, col, key):
    stat = agg.get(col, {}).get(key)
    return None if not stat else stat["mean"]


def write_report(out: Path, name: str, results: Sequence[Dict[str, Any]], columns: Sequence[Column],
                 wandb_cfg: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Write every output; returns the aggregates and the paths."""
    out.mkdir(parents=True, exist_ok=True)
    agg = aggregate(results)
    (out / "matrix.md").write_text(markdown(name, results, agg, columns))
    write_csvs(out, results, agg)
    hm = out / "heatmap.png"
    has_hm = heatmap(hm, agg, columns, f"{name}: mean AUROC (test split)")
    payload = {"name": name, "cells": list(results),
               "summary": [{"dataset": c[0], "model": c[1], "attack": c[2], "metric": k, **s}
                           for c, m in agg.items() for k, s in sorted(m.items())]}
    wandb_dir = None
    if wandb_cfg is not None and wandb_cfg.get("summary", True):
        wandb_dir = wandb_summary(out, name, wandb_cfg, results, agg, columns, hm if has_hm else None)
    payload["wandb_summary_run"] = wandb_dir
    (out / "matrix.json").write_text(json.dumps(payload, indent=1, sort_keys=True))
    return {"aggregate": agg, "markdown": out / "matrix.md", "wandb_summary_run": wandb_dir,
            "heatmap": hm if has_hm else None}
