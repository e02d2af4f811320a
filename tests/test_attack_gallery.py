"""scripts/attack_gallery.py draws registered attacks (all of them by default) into PNG files."""

import importlib.util
from pathlib import Path

import numpy as np
from PIL import Image

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "attack_gallery.py"


def load():
    spec = importlib.util.spec_from_file_location("attack_gallery", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gallery_draws_the_registry(tmp_path, monkeypatch, capsys):
    gallery = load()
    from tiny_attacks import TINY

    from lightning_backdoor.attacks import create_attack, list_attacks

    drawn = []
    monkeypatch.setattr(gallery, "render", lambda name, rows, path: drawn.append((name, list(rows))))
    # the fitted attacks with seconds-long fits on 200 digits (the script's own settings take minutes)
    monkeypatch.setattr(gallery, "create_attack", lambda name, **kw: create_attack(name, **{**TINY.get(name, {}), **kw}))
    small = gallery.fit_data()
    monkeypatch.setattr(gallery, "fit_data", lambda seed=0: type(small)(small.images[:200], small.targets[:200]))
    gallery.main(["--out", str(tmp_path), "--images", "2"])
    fitted = {n for n in list_attacks() if getattr(gallery.ATTACKS.get(n), "requires_fit", False)}
    out = capsys.readouterr().out
    assert {n for n, _ in drawn} | {n for n in fitted if "skipped" in out} == set(list_attacks())
    assert dict(drawn)["adaptive_patch"] == ["clean", "poisoned", "train-time poisoned", "difference"]
    # one real picture: digits of classes 1 and 2, four rows
    monkeypatch.undo()
    gallery.main(["--out", str(tmp_path), "--attacks", "batt", "--images", "2"])
    img = np.asarray(Image.open(tmp_path / "batt.png"))
    assert img.ndim == 3 and img.shape[0] > 50 and img.shape[1] > 50
    digits = gallery.digits(3)
    assert digits.shape == (3, 1, 28, 28) and 0 <= float(digits.min()) and float(digits.max()) <= 1
