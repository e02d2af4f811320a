"""The README's commands and snippet work as written (issue 9): the snippet runs and gives believable numbers."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def snippet(title: str) -> str:
    section = README.split(title, 1)[1]
    return re.search(r"```python\n(.*?)```", section, flags=re.S).group(1)


def test_readme_has_exactly_the_two_setup_commands():
    setup = README.split("## Set up", 1)[1].split("\n## ", 1)[0]
    commands = re.findall(r"```bash\n(.*?)```", setup, flags=re.S)
    assert [c.strip() for c in commands] == [
        'python3 -m venv .venv && . .venv/bin/activate && pip install -e . && lightning-backdoor fit --config '
        'configs/quickstart.yaml',
        'python3 -m venv .venv && . .venv/bin/activate && pip install -e ".[test]" && pytest',
    ]
    ci = (ROOT / ".ci" / "run").read_text()
    assert 'pip install -e ".[test]" && pytest' in ci


def test_own_lightning_script_snippet_runs_with_believable_numbers(tmp_path):
    code = snippet("### In your own Lightning script")
    assert "max_epochs=5" in code and "every_n_epochs=5" in code
    # run exactly as written (about a minute on 2 CPU cores)
    # the fit's metrics (val/...) before trainer.test replaces them with the test's
    assert code.count("trainer.test(") == 1
    code = code.replace("trainer.test(", "fit_metrics = dict(trainer.callback_metrics)\ntrainer.test(")
    code += ("\nimport json\nprint('RESULTS ' + json.dumps({k: float(v) for k, v in "
             "{**fit_metrics, **trainer.callback_metrics}.items()}))\n")
    env = dict(os.environ, WANDB_MODE="offline", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=1800,
                          env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(ln for ln in reversed(proc.stdout.splitlines()) if ln.startswith("RESULTS "))
    results = json.loads(line[len("RESULTS "):])
    assert results["test/ba"] > 0.8 and results["test/asr"] > 0.8, results
    for det in ("scale_up", "ibd_psc", "strip"):
        assert 0.0 <= results[f"test/{det}/auroc"] <= 1.0 and f"val/{det}/auroc" in results, (det, results)
