"""Every example runs in its small mode and prints numbers a user can believe (issue 9).

A trained model must be far above chance on clean data and the backdoor must work; detector metrics
must be real numbers in [0, 1]. (The first version of an example sliced the label-sorted MNIST digits
and printed val/ba 0.0, val/asr 1.0.)
"""

import json
import os
import subprocess
import sys
from pathlib import Path


EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def run_example(name, *args, timeout=1800):
    env = dict(os.environ, WANDB_MODE="offline", OMP_NUM_THREADS="2")
    proc = subprocess.run([sys.executable, str(EXAMPLES / name), *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=EXAMPLES.parent)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(ln for ln in reversed(proc.stdout.splitlines()) if ln.startswith("RESULTS "))
    return json.loads(line[len("RESULTS "):]), proc


def test_every_example_has_a_test():
    tested = {"add_callback_to_my_training.py", "poison_and_detect.py"}
    assert {p.name for p in EXAMPLES.glob("*.py")} == tested


def test_add_callback_to_my_training_prints_believable_numbers():
    results, _ = run_example("add_callback_to_my_training.py")  # as a user runs it: 6 epochs, ~25 s
    assert results["val/ba"] > 0.8, results  # 10 classes, 6 epochs of a small CNN on real digits
    assert results["val/asr"] > 0.8, results
    for det in ("scale_up", "ibd_psc", "strip"):
        assert 0.0 <= results[f"val/{det}/auroc"] <= 1.0, (det, results)


def test_poison_and_detect_prints_believable_numbers():
    results, _ = run_example("poison_and_detect.py", "--quick")  # 3 epochs, ~45 s
    assert results["test/ba"] > 0.8 and results["test/asr"] > 0.8, results
    for det in ("scale_up", "ibd_psc", "strip"):
        assert 0.0 <= results[f"test/{det}/auroc"] <= 1.0, (det, results)
