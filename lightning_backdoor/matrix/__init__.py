"""The attack × defence matrix: one command for the table every backdoor paper has.

    lightning-backdoor matrix --config configs/matrix/mnist5k.yaml [--executor ray --workers 2]

    from lightning_backdoor.matrix import load_matrix_config, run_matrix
    report = run_matrix(load_matrix_config("configs/matrix/mnist5k.yaml"))

Each cell of the grid (attacks × seeds, optionally × models × datasets; see
:mod:`lightning_backdoor.matrix.config`) is an ordinary ``fit`` + ``test`` run of the CLI with every
configured detector (and Neural Cleanse, when its callback is in the cell config) — an ordinary W&B
run a user can open. Finished cells (a ``result.json`` with status ok) are skipped when the matrix runs
again; a failed cell is reported and the others go on. Cells run in this process, on Ray or through
submitit (:mod:`lightning_backdoor.matrix.executors`). The outputs — Markdown, CSV, JSON, a heatmap and
a W&B summary run — are described in :mod:`lightning_backdoor.matrix.report`.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from typing import Any, Dict, List, Optional, Sequence

from .cells import Cell, build_cells, config_digest, read_result, run_cell
from .config import EXECUTORS, MatrixConfig, MatrixConfigError, load_matrix_config, parse_matrix_config
from .executors import RUNNERS
from .report import column_of, write_report

__all__ = ["Cell", "MatrixConfig", "MatrixConfigError", "build_cells", "load_matrix_config", "matrix_main",
           "parse_matrix_config", "read_result", "run_cell", "run_matrix"]


def run_matrix(cfg: MatrixConfig, *, resume: bool = True, report: bool = True, run: bool = True,
               log: Any = print) -> Dict[str, Any]:
    """Run every unfinished cell of ``cfg`` and write the outputs.

    ``run=False`` runs nothing: the outputs are written from the cells that finished so far (a look at a
    grid that is still running, or was stopped); the others are listed as ``pending``.

    Returns ``{"results": [...], "skipped": [keys], "failed": [keys], "out_dir": Path, "wall_s": float,
    "aggregate": {...}, "markdown": Path, ...}``.
    """
    out = cfg.output_dir()
    out.mkdir(parents=True, exist_ok=True)
    cells = build_cells(cfg)
    done: Dict[str, Dict[str, Any]] = {}
    changed: List[str] = []
    if resume:
        for c in cells:
            r = read_result(c.out_dir)
            if r is not None and r.get("status") == "ok":
                if r.get("config_digest") == config_digest(c.config):
                    done[c.key] = r
                else:  # the matrix config changed since this cell ran: its numbers are not this config's
                    changed.append(c.key)
    if changed:
        log(f"matrix {cfg.name}: re-running {len(changed)} finished cell(s) whose config changed since they ran: "
            + ", ".join(changed))
    pending = [c for c in cells if c.key not in done]
    log(f"matrix {cfg.name}: {len(cells)} cells, {len(done)} finished before, {len(pending)} to run "
        f"({cfg.executor.kind}, {cfg.executor.workers} worker(s)); outputs in {out}")
    results: Dict[str, Dict[str, Any]] = dict(done)
    start = time.perf_counter()

    def on_result(r: Dict[str, Any]) -> None:
        results[r["key"]] = r
        status = r.get("status")
        msg = (f"  {r['key']}: {status} in {r.get('wall_s', 0):.0f}s"
               + (f", BA {r['metrics'].get('test/ba', float('nan')):.3f} ASR {r['metrics'].get('test/asr', float('nan')):.3f}"
                  if status == "ok" else f" — {((r.get('error') or '').strip().splitlines() or [''])[-1]}"))
        log(msg)

    if not run:  # report what is on disk: failed cells as failed, cells never run as pending
        for c in pending:
            r = read_result(c.out_dir)
            if r is not None and r.get("config_digest") == config_digest(c.config):
                results[c.key] = r
        log(f"matrix {cfg.name}: report only; not run: "
            + (", ".join(c.key for c in cells if c.key not in results) or "nothing"))
    elif pending:
        RUNNERS[cfg.executor.kind]([c.to_dict() for c in pending], cfg.executor, on_result, out)
    wall = time.perf_counter() - start
    ordered = [results[c.key] for c in cells if c.key in results]
    summary: Dict[str, Any] = {"results": ordered, "skipped": sorted(done), "out_dir": out, "wall_s": wall,
                               "failed": [r["key"] for r in ordered if r.get("status") != "ok"],
                               "pending": [c.key for c in cells if c.key not in results]}
    if report:
        columns = []
        for c in cells:
            col = column_of(c.to_dict())
            if col not in columns:
                columns.append(col)
        summary.update(write_report(out, cfg.name, ordered, columns, cfg.wandb))
        log(f"matrix {cfg.name}: {len(ordered) - len(summary['failed'])} ok, {len(summary['failed'])} failed, "
            f"{wall:.0f}s; table: {summary['markdown']}")
    return summary


def matrix_main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """``lightning-backdoor matrix ...``."""
    parser = argparse.ArgumentParser(prog="lightning-backdoor matrix", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-c", "--config", required=True, help="matrix YAML (configs/matrix/*.yaml)")
    parser.add_argument("--executor", choices=EXECUTORS, help="override executor.kind")
    parser.add_argument("--workers", type=int, help="override executor.workers (parallel cells)")
    parser.add_argument("--address", help="override executor.address (a Ray cluster)")
    parser.add_argument("--out", help="override out_dir (default: matrix/<name> under the working directory)")
    parser.add_argument("--seeds", type=int, nargs="+", help="override seeds")
    parser.add_argument("--attacks", nargs="+", help="run only these attacks of the config")
    parser.add_argument("--no-resume", action="store_true", help="re-run cells that already finished")
    parser.add_argument("--report-only", action="store_true",
                        help="run nothing: write the tables from the cells finished so far")
    args = parser.parse_args(list(argv) if argv is not None else sys.argv[2:])
    try:
        cfg = load_matrix_config(args.config)
        ex = cfg.executor
        if args.executor:
            ex = dataclasses.replace(ex, kind=args.executor)
        if args.workers:
            if args.workers < 1:
                parser.error(f"--workers must be >= 1, got {args.workers}")
            ex = dataclasses.replace(ex, workers=args.workers)
        if args.address:
            ex = dataclasses.replace(ex, address=args.address)
        cfg = dataclasses.replace(cfg, executor=ex)
        if args.out:
            cfg = dataclasses.replace(cfg, out_dir=args.out)
        if args.seeds:
            cfg = dataclasses.replace(cfg, seeds=list(dict.fromkeys(args.seeds)))
        if args.attacks:
            unknown = sorted(set(args.attacks) - set(cfg.attacks))
            if unknown:
                parser.error(f"--attacks {unknown} are not in the config; it has {sorted(cfg.attacks)}")
            cfg = dataclasses.replace(cfg, attacks={k: v for k, v in cfg.attacks.items() if k in args.attacks})
    except (MatrixConfigError, FileNotFoundError) as err:
        raise SystemExit(f"lightning-backdoor matrix: {err}") from None
    return run_matrix(cfg, resume=not args.no_resume, run=not args.report_only)
