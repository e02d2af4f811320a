"""Where the cells run: in this process one after the other (default), on Ray, or through submitit (SLURM).

The cells are independent, so any engine that runs a Python function somewhere will do; we use existing
ones instead of a pool of our own:

- ``sequential``: this process, no extra dependency.
- ``ray``: ``ray.init()`` locally (``workers`` cells at a time, ``cpus_per_cell`` threads each (default: the cores shared out), on
  loopback) or on a cluster (``address: "ray://head:10001"`` or ``"auto"``); ``gpus_per_cell: 1``
  gives every cell its own GPU. Needs ``pip install "lightning-backdoor[ray]"``.
- ``submitit``: one job per cell, SLURM when available (``slurm_partition``, ``timeout_min``,
  ``slurm_additional_parameters``; ``workers`` caps the array parallelism), or ``cluster: local`` to run
  the jobs as local processes. Needs ``pip install "lightning-backdoor[slurm]"``.

Whatever the engine, a cell runs :func:`~lightning_backdoor.matrix.cells.run_cell` with the same config,
seed and thread count (``ExecutorConfig.cell_threads``), so with the same thread count its numbers do not depend
on the engine (tested: sequential == Ray, one thread per cell).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Dict, List

from .cells import run_cell
from .config import ExecutorConfig

OnResult = Callable[[Dict[str, Any]], None]


def _cell_env() -> Dict[str, str]:
    keep = ("WANDB_MODE", "WANDB_SILENT", "WANDB_DISABLE_GIT", "WANDB_CONSOLE", "WANDB_BASE_URL", "WANDB_API_KEY",
            "PYTHONPATH")
    return {k: os.environ[k] for k in keep if k in os.environ}


def run_sequential(cells: List[Dict[str, Any]], ex: ExecutorConfig, on_result: OnResult, out: Path) -> None:
    for cell in cells:
        on_result(run_cell(cell, cpus=ex.cell_threads()))


def _cell_task(cell: Dict[str, Any], cpus: int, env: Dict[str, str]) -> Dict[str, Any]:
    os.environ.update(env)
    os.environ.setdefault("OMP_NUM_THREADS", str(cpus))
    return run_cell(cell, cpus=cpus)


def run_ray(cells: List[Dict[str, Any]], ex: ExecutorConfig, on_result: OnResult, out: Path) -> None:
    try:
        import ray
    except ImportError as err:  # pragma: no cover - depends on the extra
        raise ImportError('executor kind "ray" needs Ray: pip install "lightning-backdoor[ray]"') from err
    started = False
    if not ray.is_initialized():
        kwargs: Dict[str, Any] = dict(include_dashboard=False, ignore_reinit_error=True, log_to_driver=False,
                                      runtime_env={"env_vars": _cell_env()})
        if ex.address:
            kwargs["address"] = ex.address
        else:  # a local instance on loopback with room for `workers` cells
            kwargs.update(num_cpus=ex.workers * ex.cell_threads(), _node_ip_address="127.0.0.1")
            if ex.gpus_per_cell:
                kwargs["num_gpus"] = None  # detect
        ray.init(**kwargs)
        started = True
    try:
        threads = ex.cell_threads()
        task = ray.remote(num_cpus=threads, num_gpus=ex.gpus_per_cell or 0, max_retries=0)(_cell_task)
        env = _cell_env()
        pending = [task.remote(cell, threads, env) for cell in cells]
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            on_result(ray.get(done[0]))
    finally:
        if started:
            ray.shutdown()


def run_submitit(cells: List[Dict[str, Any]], ex: ExecutorConfig, on_result: OnResult, out: Path) -> None:
    try:
        import submitit
    except ImportError as err:  # pragma: no cover - depends on the extra
        raise ImportError('executor kind "submitit" needs submitit: pip install "lightning-backdoor[slurm]"') from err
    executor = submitit.AutoExecutor(folder=str(out / "submitit" / "%j"), cluster=ex.cluster)
    params: Dict[str, Any] = dict(timeout_min=ex.timeout_min, cpus_per_task=ex.cell_threads())
    if ex.gpus_per_cell:
        params["gpus_per_node"] = int(ex.gpus_per_cell)
    if executor.cluster == "slurm":
        params["slurm_array_parallelism"] = ex.workers
        if ex.slurm_partition:
            params["slurm_partition"] = ex.slurm_partition
        if ex.slurm_additional_parameters:
            params["slurm_additional_parameters"] = dict(ex.slurm_additional_parameters)
    executor.update_parameters(**params)
    env = _cell_env()
    jobs = [executor.submit(_cell_task, cell, ex.cell_threads(), env) for cell in cells]
    for job in submitit.helpers.as_completed(jobs):
        try:
            on_result(job.result())
        except Exception as err:  # the job itself died (killed, out of memory): report it as a failed cell
            cell = cells[jobs.index(job)]
            on_result({k: cell[k] for k in ("key", "attack", "seed", "model", "dataset")}
                      | {"status": "failed", "error": f"submitit job {job.job_id} failed: {err}", "metrics": {}})


RUNNERS = {"sequential": run_sequential, "ray": run_ray, "submitit": run_submitit}
