"""DDP on CPU (gloo, 2 processes) gives the single-process BA, ASR and detector metrics on the same checkpoint.

The DDP run is a subprocess (``tests/ddp_worker.py``, Lightning's ``ddp`` launcher re-runs it for
rank 1); its process group listens on loopback only. The test set has an odd size, so a padding
sampler would count some samples twice.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import ddp_worker

WORKER = Path(ddp_worker.__file__)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    ckpt = str(tmp / "model.ckpt")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ddp_worker.train(ckpt)
        ddp_worker.evaluate(ckpt, str(tmp / "single"), ddp=False)
    finally:
        torch.set_num_threads(threads)
    env = {**os.environ, "WANDB_MODE": "disabled", "MASTER_ADDR": "127.0.0.1", "OMP_NUM_THREADS": "1",
           "PYTHONWARNINGS": "ignore"}
    env.pop("MASTER_PORT", None)
    proc = subprocess.run([sys.executable, str(WORKER), "ddp", ckpt, str(tmp / "ddp")], env=env, cwd=tmp,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    single = json.loads((tmp / "single" / "rank0.json").read_text())
    ranks = [json.loads((tmp / "ddp" / f"rank{r}.json").read_text()) for r in (0, 1)]
    return single, ranks


def test_two_ranks_ran(runs):
    single, ranks = runs
    assert single["world_size"] == 1
    assert [r["rank"] for r in ranks] == [0, 1] and {r["world_size"] for r in ranks} == {2}


def test_ba_and_asr_equal_single_process_exactly(runs):
    single, ranks = runs
    for key in ("test/ba", "test/asr", "bm/test/ba", "bm/test/asr"):
        for r in ranks:
            assert r["metrics"][key] == single["metrics"][key], (key, r["rank"], r["metrics"][key], single["metrics"][key])
    assert 0 < single["metrics"]["test/ba"] < 1 and 0 < single["metrics"]["test/asr"] < 1  # not a degenerate model


def test_detector_metrics_equal_single_process(runs):
    single, ranks = runs
    keys = [k for k in single["metrics"] if k.startswith("test/") and k.count("/") >= 2 and not k.endswith("relative_cost")]
    assert {k.split("/")[1] for k in keys} == {"scale_up", "ibd_psc", "strip"}
    assert any(k.endswith("/auroc") for k in keys) and any("/successful/" in k for k in keys)
    for r in ranks:
        assert set(keys) <= set(r["metrics"])
        for key in keys:
            assert r["metrics"][key] == pytest.approx(single["metrics"][key], abs=1e-6), key


def test_detector_fitting_identical_on_every_rank(runs):
    single, ranks = runs
    for r in ranks:
        assert r["ibd_psc"] == single["ibd_psc"]  # k and the benign error rates behind it
        assert r["scale_up"] == single["scale_up"]  # per-class SPC statistics and threshold
        assert r["strip"] == single["strip"]


def test_each_sample_evaluated_exactly_once_and_work_split(runs):
    single, ranks = runs
    for loader in ("0", "1"):  # the module's own test loop: clean and poisoned loaders
        everything = sorted(single["seen"][loader])
        per_rank = [r["seen"][loader] for r in ranks]
        assert sorted(per_rank[0] + per_rank[1]) == everything  # no sample repeated, none missing
        assert abs(len(per_rank[0]) - len(per_rank[1])) <= 1
    assert single["seen"]["0"] and len(single["seen"]["0"]) == ddp_worker.TEST_SIZE
    for kind in ("benign", "poisoned"):  # the detection callback: each rank scores only its share
        n = single["num_scored"][kind]
        shares = [r["num_scored"][kind] for r in ranks]
        assert sum(shares) == n and max(shares) == (n + 1) // 2
