"""DetectionCallback runs every registered detector in one pass, and its state survives weights-only loading."""

import io

import lightning as L
import pytest
import torch

from lightning_backdoor import BackdoorClassifier, BackdoorDataModule
from lightning_backdoor.attacks import BadNets
from lightning_backdoor.callbacks import DetectionCallback
from lightning_backdoor.defenses import NeuralCleanse
from lightning_backdoor.detectors import (
    IBDPSC,
    BaDExpert,
    NeuralCleanseFilter,
    DeepSweep,
    Frequency,
    ScaleUp,
    ShrinkPad,
    Strip,
    TeCo,
    list_detectors,
)

pytest.importorskip("imagecorruptions")


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def cheap_detectors():
    return [ScaleUp(mode="data_limited"), IBDPSC(k=1), Strip(n=4),
            TeCo(corruptions=("gaussian_noise", "contrast", "pixelate"), severities=(1, 3)), ShrinkPad(n=3),
            DeepSweep(n_affine=1), Frequency(epochs=1), BaDExpert(expert_epochs=1, aux_epochs=1),
            NeuralCleanseFilter(NeuralCleanse(steps=5, batch_size=4, max_samples=30))]


def test_all_detectors_in_one_pass(tiny_net):
    dets = cheap_detectors()
    assert sorted(d.name for d in dets) == list_detectors()  # every registered detector is exercised
    cb = DetectionCallback(dets, stages=("test",), max_samples=40, fit_samples=60, progress=False, plots=False)
    dm = BackdoorDataModule("mnist5k", attack=BadNets(), target=0, rate=0.1, val_size=100, defense_size=100,
                            test_size=100, batch_size=64, eval_batch_size=25)
    trainer = L.Trainer(max_epochs=1, limit_train_batches=3, enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False, logger=False, num_sanity_val_steps=0, limit_val_batches=0,
                        accelerator="cpu", callbacks=[cb])
    module = BackdoorClassifier(tiny_net)
    trainer.fit(module, dm)
    trainer.test(module, dm, verbose=False)
    logged = trainer.callback_metrics
    for d in dets:
        for key in ("auroc", "f1", "tpr@fpr5", "relative_cost"):
            assert f"test/{d.name}/{key}" in logged, (d.name, key)
        assert torch.isfinite(logged[f"test/{d.name}/auroc"])
    assert cb.last_num_scored == {"benign": 40, "poisoned": 40}
    # the callback's state (every detector's fitted state) loads with weights_only=True, as in a checkpoint
    buf = io.BytesIO()
    torch.save(cb.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    fresh = DetectionCallback(cheap_detectors(), stages=("test",))
    fresh.load_state_dict(state)
    x = torch.rand(3, 1, 28, 28)
    for a, b in zip(dets, fresh.detectors):
        assert b.fitted == a.fitted and b.threshold == a.threshold, a.name
        if a.name in ("frequency", "badexpert", "scale_up", "strip", "neural_cleanse_filter"):
            assert torch.equal(a.score(tiny_net, x), b.score(tiny_net, x)), a.name
