"""The attack x defence matrix end to end on fast_dev_run-sized cells: sequential and Ray, resume, failures, outputs."""

import csv
from pathlib import Path
import json
import re
import sys

import pytest

from lightning_backdoor.matrix import MatrixConfigError, build_cells, parse_matrix_config, run_matrix
from lightning_backdoor.wandb_utils import read_offline_run

ROOT = Path(__file__).resolve().parents[1]

CELL = {
    "trainer": {
        "max_epochs": 1, "limit_train_batches": 2, "limit_val_batches": 2, "limit_test_batches": 2,
        "num_sanity_val_steps": 0, "enable_progress_bar": False, "enable_model_summary": False, "accelerator": "cpu",
        "logger": {"class_path": "lightning_backdoor.loggers.BackdoorWandbLogger",
                   "init_args": {"project": "lb-test", "save_dir": ".", "offline": True}},
        "callbacks": [{"class_path": "lightning_backdoor.callbacks.DetectionCallback",
                       "init_args": {"detectors": [{"class_path": "lightning_backdoor.detectors.ScaleUp"},
                                                   {"class_path": "lightning_backdoor.detectors.Strip",
                                                    "init_args": {"n": 3}}],
                                     "stages": ["test"], "max_samples": 40, "fit_samples": 40, "progress": False,
                                     "plots": False}}],
    },
    "model": {"class_path": "lightning_backdoor.BackdoorClassifier",
              "init_args": {"net": {"class_path": "lightning_backdoor.models.CifarResNet",
                                    "init_args": {"num_blocks": [1, 1, 1], "width": 4, "num_classes": 10,
                                                  "in_channels": 1}}}},
    "data": {"class_path": "lightning_backdoor.BackdoorDataModule",
             "init_args": {"dataset": "mnist5k", "target": 0, "rate": 0.1, "batch_size": 32, "eval_batch_size": 32,
                           "val_size": 64, "defense_size": 64}},
}
ATTACKS = {
    "badnets": {"data.init_args.attack": {"class_path": "lightning_backdoor.attacks.BadNets"}},
    "blended": {"data.init_args.attack": {"class_path": "lightning_backdoor.attacks.Blended"}},
}
BROKEN = {"broken": {"data.init_args.attack": {"class_path": "lightning_backdoor.attacks.BadNets",
                                               "init_args": {"patch_size": 40}}}}  # larger than a 28x28 digit


def config(out, attacks=ATTACKS, **executor):
    return parse_matrix_config({"name": "tiny", "cell": CELL, "seeds": [0, 1], "attacks": attacks,
                                # one thread per cell everywhere: the sequential and Ray runs compare bit for bit
                                "executor": executor or {"kind": "sequential", "cpus_per_cell": 1}, "out_dir": str(out),
                                "wandb": {"project": "lb-test", "offline": True}})


def comparable(results):
    """Every metric except the timing ones (relative_cost is a ratio of measured times)."""
    return {r["key"]: {k: v for k, v in r["metrics"].items() if not k.endswith("relative_cost")} for r in results}


@pytest.fixture(scope="module")
def sequential(tmp_path_factory):
    out = tmp_path_factory.mktemp("matrix_seq")
    return out, run_matrix(config(out, {**ATTACKS, **BROKEN}), log=lambda *_: None)


def test_cells_are_ordinary_runs_with_their_own_folder_and_wandb_run(sequential):
    out, report = sequential
    keys = [r["key"] for r in report["results"]]
    assert keys == ["badnets-seed0", "badnets-seed1", "blended-seed0", "blended-seed1", "broken-seed0", "broken-seed1"]
    ok = [r for r in report["results"] if r["status"] == "ok"]
    assert len(ok) == 4
    for r in ok:
        cell_dir = out / "cells" / r["key"]
        assert (cell_dir / "config.yaml").is_file() and (cell_dir / "result.json").is_file()
        assert 0 <= r["metrics"]["test/ba"] <= 1 and "test/scale_up/auroc" in r["metrics"]
        assert r["wandb"]["dir"].startswith(str(cell_dir)) and list((cell_dir / "wandb").glob("offline-run-*"))
    # seeds really differ: another poisoned set / init gives other numbers
    m = {r["key"]: r["metrics"] for r in ok}
    assert m["badnets-seed0"]["test/ba"] != m["badnets-seed1"]["test/ba"]


def test_a_failing_cell_is_reported_and_the_others_go_on(sequential):
    out, report = sequential
    assert report["failed"] == ["broken-seed0", "broken-seed1"]
    broken = json.loads((out / "cells" / "broken-seed0" / "result.json").read_text())
    assert broken["status"] == "failed" and "patch_size" in broken["error"] and "larger than the image" in broken["error"]
    md = (out / "matrix.md").read_text()
    assert "## Failed cells" in md and "`broken-seed0`" in md


def test_markdown_and_csv_parse_back_to_the_same_numbers(sequential):
    out, report = sequential
    agg = {(row["attack"], row["metric"]): row for row in json.loads((out / "matrix.json").read_text())["summary"]}
    with open(out / "summary.csv") as f:
        for row in csv.DictReader(f):
            ref = agg[(row["attack"], row["metric"])]
            assert float(row["mean"]) == ref["mean"] and float(row["std"]) == ref["std"] and int(row["n"]) == ref["n"]
    with open(out / "cells.csv") as f:
        rows = list(csv.DictReader(f))
    by_cell = {(r["cell"], r["metric"]): float(r["value"]) for r in rows}
    for r in report["results"]:
        for k, v in r["metrics"].items():
            assert by_cell[(r["key"], k)] == v
    # the Markdown table shows mean ± std of the two seeds, rounded to 3 digits
    md = (out / "matrix.md").read_text()
    row = next(ln for ln in md.splitlines() if ln.startswith("| scale_up |"))
    cells = [c.strip() for c in row.strip("|").split("|")][1:]
    header = next(ln for ln in md.splitlines() if ln.startswith("| detector |"))
    attacks = [c.strip() for c in header.strip("|").split("|")][1:]
    for attack, text in zip(attacks, cells):
        if attack == "broken":
            assert text == "—"
            continue
        mean, std = map(float, re.fullmatch(r"([\d.]+) ± ([\d.]+)", text).groups())
        ref = agg[(attack, "test/scale_up/auroc")]
        assert mean == pytest.approx(ref["mean"], abs=5e-4) and std == pytest.approx(ref["std"], abs=5e-4)
    assert (out / "heatmap.png").stat().st_size > 1000


def test_wandb_summary_run_holds_the_tables(sequential):
    out, report = sequential
    summary = read_offline_run(report["wandb_summary_run"], wait=30)["summary"]
    assert summary["matrix/auroc/_type"] == "table-file" and summary["matrix/cells/nrows"] == 6
    table = json.loads(open(f"{report['wandb_summary_run']}/files/{summary['matrix/cells/path']}").read())
    runs = {row[0]: row[6] for row in table["data"]}
    assert runs["badnets-seed0"] == json.loads((out / "cells" / "badnets-seed0" / "result.json").read_text())["wandb"]["id"]
    assert summary["matrix/heatmap/_type"].startswith("image")


def test_resume_skips_finished_cells_and_retries_failed_ones(sequential):
    out, first = sequential
    stamps = {r["key"]: (out / "cells" / r["key"] / "result.json").stat().st_mtime_ns for r in first["results"]}
    again = run_matrix(config(out, {**ATTACKS, **BROKEN}), log=lambda *_: None, report=False)
    assert again["skipped"] == ["badnets-seed0", "badnets-seed1", "blended-seed0", "blended-seed1"]
    for key in again["skipped"]:
        assert (out / "cells" / key / "result.json").stat().st_mtime_ns == stamps[key]
    assert (out / "cells" / "broken-seed0" / "result.json").stat().st_mtime_ns != stamps["broken-seed0"]
    assert comparable(again["results"]) == comparable(first["results"])


def test_two_ray_workers_give_the_sequential_results(sequential, tmp_path):
    pytest.importorskip("ray")
    _, seq = sequential
    par = run_matrix(config(tmp_path, kind="ray", workers=2, cpus_per_cell=1), log=lambda *_: None, report=False)
    assert not par["failed"]
    ok_seq = [r for r in seq["results"] if r["status"] == "ok"]
    assert comparable(par["results"]) == comparable(ok_seq)


def test_cell_threads_default_to_the_machines_cores(monkeypatch):
    """Sequential cells keep torch's own thread count (every core; a 1-thread default ran the embedded matrix on
    one of this machine's two cores); a local Ray instance shares the cores out between its workers; a given
    cpus_per_cell wins everywhere."""
    import os

    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    threads = lambda **ex: parse_matrix_config({"name": "x", "cell": CELL, "attacks": ATTACKS,
                                                "executor": ex}).executor.cell_threads()
    assert threads(kind="sequential") is None
    assert threads(kind="sequential", cpus_per_cell=3) == 3
    assert threads(kind="ray", workers=2) == 4
    assert threads(kind="ray", workers=16) == 1
    assert threads(kind="ray", workers=2, address="auto") == 1
    assert threads(kind="submitit") == 1
    with pytest.raises(ValueError, match="executor.cpus_per_cell"):
        threads(kind="sequential", cpus_per_cell=0)


def test_bad_matrix_configs_are_refused_clearly(tmp_path):
    with pytest.raises(MatrixConfigError, match="attacks must name at least one"):
        parse_matrix_config({"name": "x", "cell": CELL, "attacks": {}})
    with pytest.raises(MatrixConfigError, match="unknown matrix config keys \\['attack'\\]"):
        parse_matrix_config({"name": "x", "cell": CELL, "attack": ATTACKS})
    with pytest.raises(ValueError, match="executor.kind must be one of"):
        parse_matrix_config({"name": "x", "cell": CELL, "attacks": ATTACKS, "executor": {"kind": "pool"}})
    with pytest.raises(MatrixConfigError, match="cell config 'nope.yaml' not found"):
        parse_matrix_config({"name": "x", "cell": "nope.yaml", "attacks": ATTACKS})
    cells = build_cells(config(tmp_path))
    assert [c.key for c in cells] == ["badnets-seed0", "badnets-seed1", "blended-seed0", "blended-seed1"]
    assert cells[1].config["seed_everything"] == 1 and cells[1].config["data"]["init_args"]["seed"] == 1
    assert cells[0].config["data"]["init_args"]["attack"]["class_path"].endswith("BadNets")


def test_resume_reruns_a_finished_cell_whose_config_changed(tmp_path):
    def one(overrides):
        return parse_matrix_config({"name": "tiny", "cell": CELL, "seeds": [0], "attacks": {"badnets": ATTACKS["badnets"]},
                                    "overrides": overrides, "out_dir": str(tmp_path),
                                    "wandb": {"project": "lb-test", "offline": True}})

    first = run_matrix(one({}), log=lambda *_: None, report=False)
    assert first["results"][0]["status"] == "ok" and first["skipped"] == []
    assert run_matrix(one({}), log=lambda *_: None, report=False)["skipped"] == ["badnets-seed0"]
    messages = []
    changed = run_matrix(one({"trainer.limit_test_batches": 1}), log=messages.append, report=False)
    assert changed["skipped"] == [] and changed["results"][0]["status"] == "ok"
    assert any("config changed" in m and "badnets-seed0" in m for m in messages)


MATRIX_CONFIGS = sorted(p for p in (Path(__file__).resolve().parents[1] / "configs" / "matrix").glob("*.yaml")
                        if not p.name.startswith("cell_"))


def _check_class_paths(node, where):
    """Every ``class_path`` imports and every ``init_args`` key is a parameter of that class (recursively)."""
    import importlib
    import inspect

    if isinstance(node, list):
        for i, item in enumerate(node):
            _check_class_paths(item, f"{where}[{i}]")
    elif isinstance(node, dict):
        if "class_path" in node:
            module, name = node["class_path"].rsplit(".", 1)
            cls = getattr(importlib.import_module(module), name)
            params = inspect.signature(cls.__init__).parameters
            takes_kwargs = any(p.kind is p.VAR_KEYWORD for p in params.values())
            for key in node.get("init_args") or {}:
                assert takes_kwargs or key in params, f"{where}: {node['class_path']} has no argument {key!r}"
        for key, value in node.items():
            _check_class_paths(value, f"{where}.{key}")


@pytest.mark.parametrize("path", MATRIX_CONFIGS, ids=[p.stem for p in MATRIX_CONFIGS])
def test_shipped_matrix_configs_build_cells_the_cli_accepts(path, tmp_path, capsys):
    """Every cell of the shipped grids names classes and arguments that exist; one cell per grid goes through the
    CLI's own parser (types, required arguments)."""
    import yaml

    from lightning_backdoor.cli import run_cli
    from lightning_backdoor.matrix import load_matrix_config

    cfg = load_matrix_config(path)
    cells = build_cells(cfg)
    assert len(cells) == len(cfg.attacks) * len(cfg.seeds) and len(cfg.attacks) >= 5
    for cell in cells:
        _check_class_paths(cell.config, cell.key)
    cell = next(c for c in cells if c.attack == "sra") if "sra" in cfg.attacks else cells[0]
    cfg_path = tmp_path / f"{cell.key}.yaml"
    cfg_path.write_text(yaml.safe_dump(cell.config, sort_keys=False))
    with pytest.raises(SystemExit) as exit_:
        run_cli(["fit", "--config", str(cfg_path), "--print_config"])
    assert exit_.value.code in (0, None), cell.key
    assert yaml.safe_load(capsys.readouterr().out)["seed_everything"] == cell.seed


def test_sigterm_stops_the_matrix_instead_of_failing_each_cell(tmp_path, monkeypatch):
    """Lightning turns SIGTERM into SIGTERMException; the first version recorded it as a failed cell and went on."""
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    import lightning_backdoor.cli

    calls = []

    def killed(args):
        calls.append(args)
        raise SIGTERMException()

    monkeypatch.setattr(lightning_backdoor.cli, "run_cli", killed)
    with pytest.raises(SIGTERMException):
        run_matrix(config(tmp_path), log=lambda *_: None, report=False)
    assert len(calls) == 1 and not list(tmp_path.glob("cells/*/result.json"))


def test_report_only_writes_the_finished_cells_and_runs_nothing(sequential, tmp_path):
    out, first = sequential
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("cells/*/result.json")}
    extra = {"wanet": {"data.init_args.attack": {"class_path": "lightning_backdoor.attacks.WaNet"}}}
    report = run_matrix(config(out, {**ATTACKS, **BROKEN, **extra}), run=False, log=lambda *_: None)
    assert report["pending"] == ["wanet-seed0", "wanet-seed1"] and not (out / "cells" / "wanet-seed0").exists()
    assert report["failed"] == ["broken-seed0", "broken-seed1"]  # as recorded on disk, not re-run
    assert {p: p.stat().st_mtime_ns for p in out.glob("cells/*/result.json")} == stamps
    assert comparable(r for r in report["results"] if r["status"] == "ok") == comparable(
        r for r in first["results"] if r["status"] == "ok")
    assert "| scale_up |" in (out / "matrix.md").read_text()


def _render_script():
    import importlib.util

    spec = importlib.util.spec_from_file_location("render_dashboards", ROOT / "scripts" / "render_dashboards.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_render_dashboards_draws_the_matrix_runs(sequential, tmp_path, monkeypatch):
    """scripts/render_dashboards.py (the docs' pictures) on a real matrix's offline runs: the summary run's table
    and heatmap and the cells' training curves; score histograms of many runs are laid out as a grid."""
    from PIL import Image

    render = _render_script()
    out, _ = sequential
    monkeypatch.setattr(sys, "argv", ["render", "--matrix", str(out), "--out", str(tmp_path / "panels")])
    render.main()
    names = {p.name for p in (tmp_path / "panels").iterdir()}
    assert {"matrix_heatmap.png", "matrix_table.png", "history.png"} <= names
    runs = [{"dir": tmp_path / "cells" / f"a{i}-seed0" / "wandb" / "offline-run-x",
             "summary": {"test/strip/scores_benign/bins": [0.0, 0.5, 1.0], "test/strip/scores_benign/values": [3, 1],
                         "test/strip/scores_poisoned/bins": [0.0, 0.5, 1.0], "test/strip/scores_poisoned/values": [1, 3]}}
            for i in range(7)]
    (path,) = render.histograms(runs, tmp_path)
    assert Image.open(path).size == (1800, 560)  # 5 columns x 2 rows of 360 x 280 px, not one row of 7
