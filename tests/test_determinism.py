"""With a fixed seed, two CPU runs give identical poisoned indices, triggers, detector scores and metrics
(BadNets, and WaNet whose cover samples draw from the global RNG while loading)."""

import lightning as L
import pytest
import torch

from tiny_net import TinyResNet
from lightning_backdoor import BackdoorClassifier, BackdoorDataModule
from lightning_backdoor.attacks import BadNets, WaNet
from lightning_backdoor.callbacks import DetectionCallback
from lightning_backdoor.detectors import IBDPSC, ScaleUp, Strip


def run(attack_cls):
    L.seed_everything(7, workers=True)
    dm = BackdoorDataModule("mnist5k", attack=attack_cls(seed=3), target=1, rate=0.1, seed=7, val_size=40,
                            defense_size=40, test_size=40, batch_size=32, eval_batch_size=40)
    module = BackdoorClassifier(TinyResNet(), optimizer=lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9),
                                noise_sigmas=[0.1])
    detection = DetectionCallback([ScaleUp(mode="data_limited"), IBDPSC(), Strip(n=3, pool_size=20)],
                                  stages=("test",), max_samples=20, noise_copies=True, progress=False, plots=False)
    trainer = L.Trainer(max_epochs=1, limit_train_batches=4, limit_val_batches=1, accelerator="cpu", devices=1,
                        deterministic=True, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False, num_sanity_val_steps=0, callbacks=[detection])
    trainer.fit(module, dm)
    trainer.test(module, dm, verbose=False)
    net = module.net.eval()
    xs = torch.stack([dm.test_poisoned[i].x for i in range(8)])
    sup, ibd, strip = detection.detectors
    batch = next(iter(dm.train_dataloader()))  # includes triggered and (WaNet) cover samples
    return {
        "poison": dm.train_set.poison_indices, "cover": dm.train_set.cover_indices,
        "trigger": {k: v.clone() for k, v in dm.attack.state_dict().items()},
        "batch": batch.x, "order": batch.index,
        "weights": {k: v.clone() for k, v in module.state_dict().items()},
        "scores": [sup.score(net, xs), ibd.score(net, xs), strip.score(net, xs, sample_ids=torch.arange(8))],
        "metrics": {k: float(v) for k, v in trainer.callback_metrics.items() if not k.endswith("relative_cost")},
    }


@pytest.mark.parametrize("attack_cls", [BadNets, WaNet], ids=["badnets", "wanet"])
def test_two_runs_with_the_same_seed_are_identical(attack_cls):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        a, b = run(attack_cls), run(attack_cls)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(a["poison"], b["poison"]) and torch.equal(a["cover"], b["cover"])
    if attack_cls is WaNet:
        assert len(a["cover"]) > 0
    assert a["trigger"].keys() == b["trigger"].keys() and a["trigger"]
    for k in a["trigger"]:
        assert torch.equal(a["trigger"][k], b["trigger"][k])
    assert torch.equal(a["batch"], b["batch"]) and torch.equal(a["order"], b["order"])
    for k in a["weights"]:
        assert torch.equal(a["weights"][k], b["weights"][k]), k
    for sa, sb in zip(a["scores"], b["scores"]):
        assert torch.equal(sa, sb)
    assert a["metrics"] == b["metrics"] and "test/ibd_psc/auroc" in a["metrics"] and "test/asr@noise0.1" in a["metrics"]
