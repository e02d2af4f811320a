"""One cell of the matrix: an ordinary ``fit`` + ``test`` run of the CLI, its results written to disk.

A cell's folder (``<out>/cells/<key>/``) holds ``config.yaml`` (the exact config it ran), its W&B run
(``wandb/``), checkpoints, and ``result.json``: status (``ok`` / ``failed``), every scalar metric the
run logged (``test/ba``, ``test/<det>/auroc``, ...), the traceback of a failure, the wall time and the
W&B run's id and folder. ``result.json`` is written atomically at the end, so a cell that has one with
status ``ok`` is finished and is skipped when the matrix is run again.
"""

from __future__ import annotations

import copy
import itertools
import json
import os
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

import yaml

from .config import MatrixConfig, set_dotted

RESULT_FILE = "result.json"


@dataclass
class Cell:
    """A grid point: which attack, seed (and model/dataset), the full config it runs and its folder."""

    key: str
    attack: str
    seed: int
    model: Optional[str]
    dataset: Optional[str]
    config: Dict[str, Any]
    out_dir: str

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


def cell_key(attack: str, seed: int, model: Optional[str] = None, dataset: Optional[str] = None) -> str:
    parts = [p for p in (dataset, model, attack) if p is not None] + [f"seed{seed}"]
    return "-".join(parts)


def build_cells(cfg: MatrixConfig) -> List[Cell]:
    """Every grid point of ``cfg``, in a fixed order (datasets, models, attacks, seeds)."""
    out = cfg.output_dir()
    cells = []
    datasets = list(cfg.datasets.items()) or [(None, {})]
    models = list(cfg.models.items()) or [(None, {})]
    for (dname, dov), (mname, mov), (aname, aov), seed in itertools.product(datasets, models, cfg.attacks.items(),
                                                                          cfg.seeds):
        key = cell_key(aname, seed, mname, dname)
        cell_dir = out / "cells" / key
        config = copy.deepcopy(cfg.cell)
        for ov in (cfg.overrides, dov, mov, aov):
            for k, v in ov.items():
                set_dotted(config, k, v)
        _localise(config, cfg, key, cell_dir, seed)
        cells.append(Cell(key, aname, seed, mname, dname, config, str(cell_dir)))
    return cells


def _localise(config: Dict[str, Any], cfg: MatrixConfig, key: str, cell_dir: Path, seed: int) -> None:
    """Seed the cell and send everything it writes (W&B run, checkpoints, logs) into its own folder."""
    config["seed_everything"] = seed
    set_dotted(config, "data.init_args.seed", seed)
    config["test_after_fit"] = True
    trainer = config.setdefault("trainer", {})
    trainer["default_root_dir"] = str(cell_dir)
    logger = trainer.get("logger")
    if isinstance(logger, dict) and "Wandb" in str(logger.get("class_path", "")):
        args = logger.setdefault("init_args", {})
        args["save_dir"] = str(cell_dir)
        args["name"] = f"{cfg.name}-{key}"
        args["project"] = cfg.wandb.get("project", args.get("project", "lightning-backdoor"))
        args["offline"] = bool(cfg.wandb.get("offline", args.get("offline", True)))
    for cb in trainer.get("callbacks") or []:
        if isinstance(cb, dict) and str(cb.get("class_path", "")).endswith("ModelCheckpoint"):
            cb.setdefault("init_args", {})["dirpath"] = str(cell_dir / "checkpoints")


def config_digest(config: Dict[str, Any]) -> str:
    """A fingerprint of a cell's config (sha256 of its canonical JSON): resume reuses a result only for
    the config that produced it."""
    import hashlib

    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


def read_result(cell_dir: str | os.PathLike) -> Optional[Dict[str, Any]]:
    """The cell's ``result.json``, or None if it has not finished."""
    path = Path(cell_dir) / RESULT_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, OSError):
        return None


def _write_result(cell_dir: Path, result: Dict[str, Any]) -> None:
    cell_dir.mkdir(parents=True, exist_ok=True)
    tmp = cell_dir / (RESULT_FILE + ".tmp")
    tmp.write_text(json.dumps(result, indent=1, sort_keys=True))
    os.replace(tmp, cell_dir / RESULT_FILE)


def _scalars(metrics: Dict[str, Any]) -> Dict[str, float]:
    out = {}
    for k, v in metrics.items():
        try:
            if hasattr(v, "numel") and v.numel() != 1:
                continue
            out[k] = float(v)
        except (TypeError, ValueError):
            continue
    return out


def run_cell(cell: Dict[str, Any], cpus: Optional[int] = None) -> Dict[str, Any]:
    """Run one cell (a :class:`Cell` as a dict) in this process: ``fit`` then ``test``; returns its result.

    Never raises for a failing run: the failure (with its traceback) is the cell's result, so the other
    cells go on. ``cpus`` sets torch's thread count for the run (restored after).
    """
    import torch

    cell_dir = Path(cell["out_dir"])
    cell_dir.mkdir(parents=True, exist_ok=True)
    cfg_path = cell_dir / "config.yaml"
    cfg_path.write_text(yaml.safe_dump(cell["config"], sort_keys=False))
    result: Dict[str, Any] = {k: cell[k] for k in ("key", "attack", "seed", "model", "dataset")}
    result["config_digest"] = config_digest(cell["config"])
    threads = torch.get_num_threads()
    if cpus:
        torch.set_num_threads(int(cpus))
    start = time.perf_counter()
    try:
        from ..cli import run_cli

        cli = run_cli(["fit", "--config", str(cfg_path)])
        result["metrics"] = _scalars(dict(cli.trainer.callback_metrics))
        result["wandb"] = _finish_wandb(cli.trainer, ok=True)
        result["status"] = "ok"
    except BaseException as err:  # noqa: BLE001 - a failed cell is a result, not a crash of the matrix
        if _is_stop_request(err):  # Ctrl-C, SIGTERM (kill, SLURM preemption): stop the matrix
            raise
        result["status"] = "failed"
        result["error"] = "".join(traceback.format_exception(type(err), err, err.__traceback__))[-6000:]
        result["metrics"] = {}
        result["wandb"] = _finish_wandb(None, ok=False)
    finally:
        torch.set_num_threads(threads)
    result["wall_s"] = time.perf_counter() - start
    _write_result(cell_dir, result)
    return result


def _is_stop_request(err: BaseException) -> bool:
    """Whether ``err`` asks the whole matrix to stop rather than being one cell's failure.

    Lightning turns a SIGTERM into ``SIGTERMException`` (a ``BaseException``); recording it as a failed cell
    and going on to the next one would make the matrix unkillable short of SIGKILL.
    """
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    return isinstance(err, (KeyboardInterrupt, SIGTERMException))


def _finish_wandb(trainer: Any, ok: bool) -> Optional[Dict[str, str]]:
    """Finish the cell's W&B run (each cell is its own run) and return its id and folder."""
    info = None
    try:
        import wandb

        run = None
        if trainer is not None:
            from lightning.pytorch.loggers import WandbLogger

            for lg in trainer.loggers:
                if isinstance(lg, WandbLogger):
                    run = lg.experiment
        run = run or wandb.run
        if run is not None:
            info = {"id": run.id, "dir": str(Path(run.dir).parent), "name": run.name or ""}
            url = getattr(run, "url", None)
            if url:
                info["url"] = url
            run.finish(exit_code=0 if ok else 1)
    except Exception:  # noqa: BLE001 - reporting must not turn a finished cell into a failed one
        pass
    return info
