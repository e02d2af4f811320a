"""NeuralCleanseCallback: documented keys (recording logger), W&B offline read-back, checkpoint state, model untouched."""

import json
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import Logger

from lightning_backdoor import BackdoorClassifier, BackdoorDataModule
from lightning_backdoor.attacks import BadNets
from lightning_backdoor.callbacks import NeuralCleanseCallback
from lightning_backdoor.defenses import NeuralCleanse
from lightning_backdoor.wandb_utils import read_offline_run


class RecordingLogger(Logger):
    """Records every ``log_metrics`` call (the Mock logger of the tests)."""

    def __init__(self):
        super().__init__()
        self.calls = []

    @property
    def name(self):
        return "recording"

    @property
    def version(self):
        return 0

    def log_metrics(self, metrics, step=None):
        self.calls.append((dict(metrics), step))

    def log_hyperparams(self, params, *args, **kwargs):
        pass

    def logged(self):
        out = {}
        for metrics, _ in self.calls:
            out.update(metrics)
        return out


def _dm():
    return BackdoorDataModule("mnist5k", attack=BadNets(), target=0, rate=0.1, val_size=50, defense_size=60,
                              batch_size=64, eval_batch_size=100, test_size=200)


def _nc():
    return NeuralCleanse(steps=8, batch_size=8, max_samples=40)


def _trainer(callbacks, **kw):
    args = dict(max_epochs=1, limit_train_batches=2, limit_val_batches=1, limit_test_batches=1,
                enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False, logger=False,
                num_sanity_val_steps=0, accelerator="cpu")
    args.update(kw)
    return L.Trainer(callbacks=callbacks, **args)


def test_logs_the_documented_keys_at_fit_end_and_test(tiny_net):
    logger = RecordingLogger()
    cb = NeuralCleanseCallback(_nc(), when=("fit_end", "test"), progress=False)
    trainer = _trainer([cb], logger=logger)
    module = BackdoorClassifier(tiny_net)
    trainer.fit(module, _dm())
    fit_keys = {k for k in logger.logged() if k.startswith("fit/neural_cleanse/")}
    expected = {"anomaly_index", "flagged", "target_flagged"} | {f"l1/{t}" for t in range(10)}
    assert fit_keys == {f"fit/neural_cleanse/{k}" for k in expected}
    fit_report = cb.cleanse.report()
    logged = logger.logged()
    for r in fit_report:
        assert logged[f"fit/neural_cleanse/l1/{r['label']}"] == pytest.approx(r["l1"])
    assert logged["fit/neural_cleanse/flagged"] == float(sum(r["flagged"] for r in fit_report))
    assert logged["fit/neural_cleanse/anomaly_index"] == pytest.approx(cb.cleanse.max_anomaly())
    assert logger.calls[-1][1] == trainer.global_step
    # test: the values land in the test results (and the logger), once
    before = {k: v.clone() for k, v in module.state_dict().items()}
    results = trainer.test(module, _dm())
    after = module.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items())  # the inspected model is not modified
    merged = {k: v for r in results for k, v in r.items()}
    for key in expected:
        assert f"test/neural_cleanse/{key}" in merged
    assert sum("test/neural_cleanse/anomaly_index" in r for r in results) == 1
    assert merged["test/neural_cleanse/l1/3"] == pytest.approx(cb.cleanse.report()[3]["l1"], rel=1e-5)
    assert "test/neural_cleanse/anomaly_index" in logger.logged()


def test_every_n_epochs_at_validation(tiny_net):
    cb = NeuralCleanseCallback(_nc(), when="validate", every_n_epochs=2, progress=False, images=False)
    trainer = _trainer([cb], max_epochs=3)
    runs = []
    original = cb._inspect

    def spy(trainer, pl_module, stage):
        runs.append((stage, trainer.current_epoch))
        return original(trainer, pl_module, stage)

    cb._inspect = spy
    trainer.fit(BackdoorClassifier(tiny_net), _dm())
    assert runs == [("validate", 1)]
    assert "val/neural_cleanse/anomaly_index" in trainer.callback_metrics


def test_progress_bar_counts_the_optimisation_steps(tiny_net, monkeypatch):
    import tqdm.auto

    bars = []

    class Recording(tqdm.auto.tqdm):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            bars.append(self)

    monkeypatch.setattr(tqdm.auto, "tqdm", Recording)
    cb = NeuralCleanseCallback(_nc(), when="test", images=False)
    _trainer([cb], enable_progress_bar=True).test(BackdoorClassifier(tiny_net), _dm(), verbose=False)
    ours = [b for b in bars if "reverse-engineering" in (b.desc or "")]
    assert len(ours) == 1 and ours[0].total == 8
    assert ours[0].n == int(cb.cleanse.steps_run.max()) and ours[0].n > 0


def test_no_clean_data_warns_and_skips(tiny_net):
    dm = BackdoorDataModule("mnist5k", attack=BadNets(), target=0, val_size=50, defense_size=0, test_size=200,
                            eval_batch_size=100)
    cb = NeuralCleanseCallback(_nc(), when="test", progress=False)
    with pytest.warns(UserWarning, match="no clean data"):
        _trainer([cb]).test(BackdoorClassifier(tiny_net), dm)


def test_fitted_state_round_trips_through_the_checkpoint(tiny_net, tmp_path):
    cb = NeuralCleanseCallback(_nc(), when="fit_end", progress=False)
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True, save_top_k=0)
    trainer = _trainer([cb, ckpt], enable_checkpointing=True)
    trainer.fit(BackdoorClassifier(tiny_net), _dm())
    # on_fit_end runs after the last checkpoint: save one now, as a later run's test would load
    trainer.save_checkpoint(tmp_path / "after.ckpt")
    state = torch.load(tmp_path / "after.ckpt", weights_only=True)
    key = next(k for k in state["callbacks"] if "NeuralCleanseCallback" in k)
    restored = NeuralCleanseCallback(NeuralCleanse(), when="test")
    assert restored.state_key == key
    restored.load_state_dict(state["callbacks"][key])
    assert restored.cleanse.report() == cb.cleanse.report()
    assert torch.equal(restored.cleanse.masks, cb.cleanse.masks)


@pytest.mark.parametrize("kwargs, match", [
    ({"when": ("train",)}, "when must be"),
    ({"when": ()}, "when must be"),
    ({"every_n_epochs": 0}, "every_n_epochs"),
    ({"cleanse": "neural_cleanse"}, "NeuralCleanse instance"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        NeuralCleanseCallback(**kwargs)


def test_wandb_offline_run_records_scalars_images_and_table(tiny_net, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "offline")
    from lightning.pytorch.loggers import WandbLogger

    logger = WandbLogger(project="lb-test", save_dir=str(tmp_path), offline=True)
    cb = NeuralCleanseCallback(_nc(), when="test", progress=False)
    trainer = _trainer([cb], logger=logger)
    trainer.test(BackdoorClassifier(tiny_net), _dm())
    expected = {k: float(v) for k, v in trainer.callback_metrics.items()}
    run_dir = Path(logger.experiment.dir).parent
    logger.experiment.finish()
    summary = read_offline_run(run_dir, wait=30)["summary"]
    for key in ("test/neural_cleanse/anomaly_index", "test/neural_cleanse/flagged", "test/neural_cleanse/l1/0",
                "test/neural_cleanse/l1/9"):
        assert summary[key] == pytest.approx(expected[key], abs=1e-6)
    for key in ("test/neural_cleanse/masks", "test/neural_cleanse/patterns"):
        assert summary[f"{key}/_type"].startswith("images")
        assert summary[f"{key}/count"] == 10
        assert (run_dir / "files" / summary[f"{key}/filenames"][0]).is_file()
    assert summary["test/neural_cleanse/labels/_type"] == "table-file"
    table = json.loads((run_dir / "files" / summary["test/neural_cleanse/labels/path"]).read_text())
    assert table["columns"] == ["label", "l1", "anomaly_index", "asr", "found", "flagged", "steps"]
    assert [row[0] for row in table["data"]] == list(range(10))
    assert [row[1] for row in table["data"]] == pytest.approx([r["l1"] for r in cb.cleanse.report()])
