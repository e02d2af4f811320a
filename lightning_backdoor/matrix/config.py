"""The matrix's YAML: a cell config, the axes of the grid (attacks × seeds × models × datasets) and the executor.

A matrix config names an ordinary ``fit`` config (``cell``: a path, relative to the matrix config, or an
inline mapping) and, per axis, named sets of **overrides** — dotted keys into that config — so that any
attack, model or dataset the CLI can build is a grid entry, whatever seam it uses (a dataset-level
``data.init_args.attack``, a batch-level attack of the module, ...)::

    name: mnist5k
    cell: cell_mnist5k.yaml             # an ordinary `lightning-backdoor fit` config
    seeds: [0, 1]
    attacks:
      badnets: {data.init_args.attack: {class_path: lightning_backdoor.attacks.BadNets}}
      blended: {data.init_args.attack: {class_path: lightning_backdoor.attacks.Blended}}
    models: {}                          # optional: name -> overrides
    datasets: {}                        # optional: name -> overrides
    overrides: {trainer.max_epochs: 5}  # applied to every cell
    executor: {kind: sequential}        # or ray (workers, address, cpus/gpus per cell) or submitit
    wandb: {project: lightning-backdoor, offline: true}

A seed sets ``seed_everything`` and ``data.init_args.seed`` (the poisoned set and the splits).
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

import yaml

from ..validation import check_choice, check_positive_int

EXECUTORS = ("sequential", "ray", "submitit")
_TOP_KEYS = {"name", "cell", "seeds", "attacks", "models", "datasets", "overrides", "executor", "wandb", "out_dir"}
_EXECUTOR_KEYS = {"kind", "workers", "address", "cpus_per_cell", "gpus_per_cell", "cluster", "timeout_min",
                  "slurm_partition", "slurm_additional_parameters"}


class MatrixConfigError(ValueError):
    """A matrix config that cannot describe a grid (the message names the key and what is accepted)."""


@dataclass
class ExecutorConfig:
    kind: str = "sequential"
    workers: int = 1
    address: Optional[str] = None
    cpus_per_cell: Optional[int] = None  # None: see cell_threads()
    gpus_per_cell: float = 0.0
    cluster: Optional[str] = None  # submitit: None (auto: slurm if available), "local", "slurm", "debug"
    timeout_min: int = 24 * 60
    slurm_partition: Optional[str] = None
    slurm_additional_parameters: Dict[str, Any] = field(default_factory=dict)

    def cell_threads(self) -> Optional[int]:
        """torch threads (and CPUs reserved) per cell: ``cpus_per_cell`` when given; otherwise every core for the
        sequential executor (``None``: torch's own default is left alone), the cores shared out between the
        ``workers`` of a local Ray instance, and 1 on a Ray cluster or under submitit (say how many there)."""
        if self.cpus_per_cell is not None:
            return int(self.cpus_per_cell)
        if self.kind == "sequential":
            return None
        if self.kind == "ray" and not self.address:
            return max(1, (os.cpu_count() or 1) // self.workers)
        return 1


@dataclass
class MatrixConfig:
    """A parsed, validated matrix config (see the module docstring)."""

    name: str
    cell: Dict[str, Any]
    attacks: Dict[str, Dict[str, Any]]
    seeds: List[int] = field(default_factory=lambda: [0])
    models: Dict[str, Dict[str, Any]] = field(default_factory=dict)
    datasets: Dict[str, Dict[str, Any]] = field(default_factory=dict)
    overrides: Dict[str, Any] = field(default_factory=dict)
    executor: ExecutorConfig = field(default_factory=ExecutorConfig)
    wandb: Dict[str, Any] = field(default_factory=lambda: {"project": "lightning-backdoor", "offline": True})
    out_dir: Optional[str] = None
    source: Optional[Path] = None

    def output_dir(self) -> Path:
        return Path(self.out_dir or os.path.join("matrix", self.name)).expanduser().resolve()


def _named_overrides(value: Any, key: str) -> Dict[str, Dict[str, Any]]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise MatrixConfigError(f"{key} must be a mapping of names to overrides (dotted config keys), got "
                                f"{type(value).__name__}")
    out: Dict[str, Dict[str, Any]] = {}
    for name, ov in value.items():
        if not isinstance(name, str) or not name or "/" in name:
            raise MatrixConfigError(f"{key}: entry names must be non-empty strings without '/', got {name!r}")
        if ov is None:
            ov = {}
        if not isinstance(ov, Mapping):
            raise MatrixConfigError(f"{key}.{name} must be a mapping of dotted config keys to values, got "
                                    f"{type(ov).__name__}")
        out[name] = dict(ov)
    return out


def parse_matrix_config(raw: Mapping[str, Any], source: Optional[Path] = None) -> MatrixConfig:
    """Validate a matrix config mapping (as loaded from YAML)."""
    if not isinstance(raw, Mapping):
        raise MatrixConfigError(f"a matrix config must be a mapping, got {type(raw).__name__}")
    unknown = sorted(set(raw) - _TOP_KEYS)
    if unknown:
        raise MatrixConfigError(f"unknown matrix config keys {unknown}; known keys: {sorted(_TOP_KEYS)}")
    name = raw.get("name")
    if not isinstance(name, str) or not name or "/" in name:
        raise MatrixConfigError(f"name must be a non-empty string without '/', got {name!r}")
    cell = raw.get("cell")
    if isinstance(cell, str):
        path = Path(cell)
        if not path.is_absolute() and source is not None:
            path = source.parent / path
        if not path.is_file():
            raise MatrixConfigError(f"cell config {cell!r} not found (looked for {path})")
        cell = yaml.safe_load(path.read_text())
    if not isinstance(cell, Mapping):
        raise MatrixConfigError("cell must be a path to a `lightning-backdoor fit` config or an inline mapping of one")
    attacks = _named_overrides(raw.get("attacks"), "attacks")
    if not attacks:
        raise MatrixConfigError("attacks must name at least one grid entry, e.g. {badnets: {data.init_args.attack: "
                                "{class_path: lightning_backdoor.attacks.BadNets}}}")
    seeds = raw.get("seeds", [0])
    if not isinstance(seeds, list) or not seeds:
        raise MatrixConfigError(f"seeds must be a non-empty list of ints, got {seeds!r}")
    seeds = [check_positive_int(s, "seeds entry", allow_zero=True) for s in seeds]
    if len(set(seeds)) != len(seeds):
        raise MatrixConfigError(f"seeds must be distinct, got {seeds}")
    overrides = raw.get("overrides") or {}
    if not isinstance(overrides, Mapping):
        raise MatrixConfigError("overrides must be a mapping of dotted config keys to values")
    ex_raw = raw.get("executor") or {}
    if not isinstance(ex_raw, Mapping):
        raise MatrixConfigError("executor must be a mapping, e.g. {kind: ray, workers: 2}")
    unknown = sorted(set(ex_raw) - _EXECUTOR_KEYS)
    if unknown:
        raise MatrixConfigError(f"unknown executor keys {unknown}; known keys: {sorted(_EXECUTOR_KEYS)}")
    ex = ExecutorConfig(**dict(ex_raw))
    check_choice(ex.kind, "executor.kind", EXECUTORS)
    check_positive_int(ex.workers, "executor.workers")
    if ex.cpus_per_cell is not None:
        check_positive_int(ex.cpus_per_cell, "executor.cpus_per_cell")
    wandb_cfg = dict(raw.get("wandb") or {"project": "lightning-backdoor", "offline": True})
    return MatrixConfig(name=name, cell=copy.deepcopy(dict(cell)), attacks=attacks, seeds=seeds,
                        models=_named_overrides(raw.get("models"), "models"),
                        datasets=_named_overrides(raw.get("datasets"), "datasets"), overrides=dict(overrides),
                        executor=ex, wandb=wandb_cfg, out_dir=raw.get("out_dir"), source=source)


def load_matrix_config(path: str | os.PathLike) -> MatrixConfig:
    """Read and validate a matrix YAML file."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"matrix config not found: {p}")
    return parse_matrix_config(yaml.safe_load(p.read_text()), source=p.resolve())


def set_dotted(cfg: Dict[str, Any], key: str, value: Any) -> None:
    """``cfg["a"]["b"]["c"] = value`` for ``key = "a.b.c"``; list elements by index (``trainer.callbacks.1``; the
    index one past the end appends)."""
    parts = key.split(".")
    node: Any = cfg
    for i, part in enumerate(parts[:-1]):
        nxt = node[int(part)] if isinstance(node, list) else node.get(part)
        if nxt is None:
            nxt = {}
            if isinstance(node, list):
                node[int(part)] = nxt
            else:
                node[part] = nxt
        if not isinstance(nxt, (dict, list)):
            raise MatrixConfigError(f"override {key!r}: {'.'.join(parts[:i + 1])!r} is not a mapping in the cell config")
        node = nxt
    last = parts[-1]
    if isinstance(node, list):
        if int(last) == len(node):  # one past the end appends (e.g. a callback the attack needs)
            node.append(copy.deepcopy(value))
            return
        node[int(last)] = copy.deepcopy(value)
    else:
        node[last] = copy.deepcopy(value)
