"""The batch-level attack seam (BackdoorClassifier + BatchAttack) and IAD: device, optimisers, cross samples,
exact resume, checkpoints, evaluation with the current generator, and dataset-level attacks unchanged."""

import copy

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

from tiny_net import TinyResNet
from lightning_backdoor import BackdoorClassifier, BackdoorDataModule
from lightning_backdoor.attacks import IAD, BadNets, BatchAttack, PoisonedBatch, create_batch_attack, list_batch_attacks
from lightning_backdoor.attacks.iad import iad_blend
from lightning_backdoor.callbacks import BackdoorMetrics, DetectionCallback
from lightning_backdoor.checkpoints import safe_load
from lightning_backdoor.data import CleanDataset, DeviceTriggerSet
from lightning_backdoor.detectors.base import Detector

BATCHES = 4


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def small_dm(attack, seed=0, **kw):
    args = dict(target=0, rate=0.1, seed=seed, val_size=40, defense_size=40, test_size=60, batch_size=32,
                eval_batch_size=60, augment=False)
    args.update(kw)
    return BackdoorDataModule("mnist5k", attack=attack, **args)


def iad(**kw):
    args = dict(hidden=4, mask_pretrain_steps=2, seed=0)
    args.update(kw)
    return IAD(**args)


def module(**kw):
    torch.manual_seed(0)
    return BackdoorClassifier(TinyResNet(width=4), optimizer=lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9),
                              scheduler=lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=1, gamma=0.5), **kw)


def trainer(tmp_path, callbacks=(), **kw):
    args = dict(max_epochs=1, limit_train_batches=BATCHES, accelerator="cpu", devices=1, deterministic=True,
                logger=False, enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                default_root_dir=str(tmp_path), enable_checkpointing=False)
    args.update(kw)
    return L.Trainer(callbacks=list(callbacks), **args)


def test_registered():
    assert "iad" in list_batch_attacks()
    assert isinstance(create_batch_attack("iad", hidden=4), IAD)


class Recording(BatchAttack):
    """Darkens the first half of each batch (label -> target) and records where the batches were."""

    name = "recording"

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(0.5))
        self.seen = []

    def apply_trigger(self, x):
        return x * self.scale.clamp(0, 1)

    def poison_batch(self, x, y, target):
        self.seen.append((x.device, self.scale.device))
        k = len(x) // 2
        xp = torch.cat([self.apply_trigger(x[:k]), x[k:]])
        mask = torch.arange(len(x), device=x.device) < k
        return PoisonedBatch(xp, torch.where(mask, torch.full_like(y, target), y), mask, torch.zeros_like(mask), {})


def test_batch_hook_gets_batches_on_the_models_device_and_the_training_set_stays_clean(tmp_path):
    attack = Recording()
    dm, m = small_dm(attack), module()
    t = trainer(tmp_path, limit_val_batches=0)
    t.fit(m, dm)
    assert isinstance(dm.train_set, CleanDataset) and isinstance(dm.test_poisoned, DeviceTriggerSet)
    assert m.batch_attack is attack and not m.automatic_optimization
    assert len(attack.seen) == BATCHES
    assert all(xd == m.device and pd == m.device for xd, pd in attack.seen)


class BatchRecorder(L.Callback):
    def __init__(self):
        self.batches = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batches.append([t.clone() if isinstance(t, torch.Tensor) else t for t in batch])


def test_dataset_level_attacks_are_unchanged(tmp_path):
    """BadNets still poisons in the data and trains with automatic optimisation: the fitted weights equal a plain
    SGD replay of the very batches the module saw (dataset-poisoned, never touched on the device)."""
    dm, m = small_dm(BadNets(patch_size=3)), module()
    start = copy.deepcopy(m.net.state_dict())
    rec = BatchRecorder()
    t = trainer(tmp_path, [rec], limit_val_batches=0)
    t.fit(m, dm)
    assert m.batch_attack is None and m.automatic_optimization
    assert not isinstance(dm.train_set, CleanDataset)
    poisoned_seen = sum(int(b[2].sum()) for b in rec.batches)
    assert poisoned_seen > 0
    for b in rec.batches:  # the poisoned samples the net saw carry the dataset's trigger and the target label
        idx = b[2]
        if bool(idx.any()):
            assert bool((b[1][idx] == 0).all())
            clean = torch.stack([dm.train_set.dataset[int(i)][0] for i in b[4][idx]])
            assert torch.allclose(b[0][idx], dm.attack(clean))
    replay = TinyResNet(width=4)
    replay.load_state_dict(start)
    opt = torch.optim.SGD(replay.parameters(), lr=0.05, momentum=0.9)
    replay.train()
    for b in rec.batches:
        opt.zero_grad()
        F.cross_entropy(replay(b[0]), b[1]).backward()
        opt.step()
    for k, v in replay.state_dict().items():
        assert torch.allclose(v.float(), m.net.state_dict()[k].float(), atol=1e-6), k


class StateRecorder(L.Callback):
    def __init__(self):
        self.states = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.states.append(self._snap(pl_module))

    def on_train_end(self, trainer, pl_module):
        self.states.append(self._snap(pl_module))

    @staticmethod
    def _snap(m):
        return {"net": torch.cat([p.detach().flatten().clone() for p in m.net.parameters()]),
                "G": torch.cat([p.detach().flatten().clone() for p in m.batch_attack.pattern_generator.parameters()]),
                "M": torch.cat([p.detach().flatten().clone() for p in m.batch_attack.mask_generator.parameters()]),
                "phase": m.batch_attack.phase()}


def test_both_optimisers_step_and_the_mask_is_pretrained_first(tmp_path):
    rec = StateRecorder()
    dm, m = small_dm(iad(mask_pretrain_steps=2)), module()
    t = trainer(tmp_path, [rec], limit_val_batches=0)
    t.fit(m, dm)
    s = rec.states
    assert [x["phase"] for x in s[:BATCHES]] == ["pretrain", "pretrain", "train", "train"]
    for a, b in zip(s[:2], s[1:3]):  # pre-training: only the mask generator moves
        assert torch.equal(a["net"], b["net"]) and torch.equal(a["G"], b["G"]) and not torch.equal(a["M"], b["M"])
    for a, b in zip(s[2:4], s[3:5]):  # training: classifier and pattern generator move, the mask is frozen
        assert not torch.equal(a["net"], b["net"]) and not torch.equal(a["G"], b["G"]) and torch.equal(a["M"], b["M"])
    opts = m.optimizers()
    assert len(opts) == 3  # classifier, pattern generator, mask generator
    assert int(m.batch_attack.steps) == BATCHES
    assert m.lr_schedulers().last_epoch == 1  # the classifier's StepLR stepped at the end of the epoch it trained in
    # the classifier's optimiser holds no generator parameter and vice versa
    gen = {id(p) for p in m.batch_attack.parameters()}
    assert not gen & {id(p) for g in opts[0].optimizer.param_groups for p in g["params"]}
    assert {id(p) for g in opts[1].optimizer.param_groups for p in g["params"]} <= gen


def test_cross_samples_keep_their_labels_and_use_another_inputs_trigger():
    attack = iad(backdoor_share=0.25, cross_share=0.25).build(1, 8, 8)
    attack.eval()
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(8, 1, 8, 8, generator=g), torch.tensor([1, 2, 3, 4, 5, 6, 7, 8])
    out = attack.poison_batch(x, y, target=0)
    assert out.poisoned.tolist() == [True] * 2 + [False] * 6 and out.cross.tolist() == [False] * 2 + [True] * 2 + [False] * 4
    assert out.y.tolist() == [0, 0, 3, 4, 5, 6, 7, 8]  # backdoor -> target; cross and clean keep the true label
    with torch.no_grad():
        G, M = attack.pattern_generator, attack.mask_generator
        own = iad_blend(x[:2], G(x[:2]), M(x[:2]))
        cross = iad_blend(x[2:4], G(x[3:5]), M(x[3:5]))  # the trigger of the neighbour in the batch
    assert torch.allclose(out.x[:2], own, atol=1e-6) and torch.allclose(out.x[2:4], cross, atol=1e-6)
    assert torch.equal(out.x[4:], x[4:])
    assert not torch.allclose(out.x[2:4], iad_blend(x[2:4], G(x[2:4]), M(x[2:4])))
    assert "diversity" in out.extras and float(out.extras["diversity"]) > 0
    assert float(out.x.min()) >= 0 and float(out.x.max()) <= 1


# -- exact resume, checkpoints, evaluation -------------------------------------------------------
class Killed(Exception):
    pass


class Crash(L.Callback):
    def __init__(self, at_batch):
        self.at, self.count = at_batch, 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.count == self.at:
            raise Killed()
        self.count += 1


def _run(tmp_path, callbacks=(), ckpt_path=None, seed=0):
    L.seed_everything(seed)
    dm, m = small_dm(iad(mask_pretrain_steps=2, scheduler=lambda o: torch.optim.lr_scheduler.StepLR(o, 1, 0.5))), module()
    t = trainer(tmp_path, callbacks, max_epochs=2, limit_val_batches=1, enable_checkpointing=True)
    t.fit(m, dm, ckpt_path=ckpt_path)
    return t, dm, m


def _optimizer_states(t):
    return [o.state_dict() for o in t.optimizers]


def test_exact_resume_of_iad(tmp_path):
    from test_resume import assert_same_state

    ref_t, _, ref_m = _run(tmp_path / "ref")
    ref = {k: v.clone() for k, v in ref_m.state_dict().items()}
    ckpt_dir = tmp_path / "ckpts"
    with pytest.raises(Killed):
        _run(tmp_path / "a", [ModelCheckpoint(dirpath=ckpt_dir, save_last=True), Crash(BATCHES + 1)])
    last = ckpt_dir / "last.ckpt"
    ck = safe_load(last)
    assert any(k.startswith("batch_attack.pattern_generator.") for k in ck["state_dict"])
    assert len(ck["optimizer_states"]) == 3 and len(ck["lr_schedulers"]) == 2
    t, _, m = _run(tmp_path / "b", [ModelCheckpoint(dirpath=tmp_path / "resumed")], ckpt_path=str(last), seed=123)
    for k, v in ref.items():
        assert torch.equal(m.state_dict()[k], v), f"{k} differs after resume"
    assert t.global_step == ref_t.global_step and int(m.batch_attack.steps) == 2 * BATCHES
    assert_same_state(_optimizer_states(t), _optimizer_states(ref_t), "optimizers")
    assert [c.scheduler.state_dict() for c in t.lr_scheduler_configs] == \
        [c.scheduler.state_dict() for c in ref_t.lr_scheduler_configs]


class InputRecorder(Detector):
    name = "recorder"

    def __init__(self):
        super().__init__()
        self.inputs = []

    def score(self, model, x):
        self.inputs.append(x.detach().clone())
        return x.flatten(1).mean(1)


def test_checkpoint_holds_the_generators_and_evaluation_uses_the_current_trigger(tmp_path):
    L.seed_everything(0)
    rec = InputRecorder()
    det = DetectionCallback([rec], stages=("test",), max_samples=None, plots=False, progress=False)
    metrics = BackdoorMetrics(stages=("test",), prefix="cb/{stage}")
    dm, m = small_dm(iad(mask_pretrain_steps=1)), module()
    t = trainer(tmp_path, [det, metrics, ModelCheckpoint(dirpath=tmp_path / "ck", save_last=True)],
                limit_val_batches=1, enable_checkpointing=True)
    t.fit(m, dm)
    res = t.test(m, dm)
    asr = res[1]["test/asr"]
    assert metrics.last_results["cb/test/asr"] == pytest.approx(asr, abs=1e-6)  # the callback triggered on the device
    # the poisoned inputs the detector scored are the current generator's triggered images
    clean = torch.stack([dm.test_poisoned[i][0] for i in range(len(dm.test_poisoned))])
    scored = torch.cat(rec.inputs)[-len(clean):]
    assert torch.allclose(scored, m.batch_attack.trigger(clean), atol=1e-6)
    # a module and a data module rebuilt from the checkpoint alone give exactly the same ASR
    path = tmp_path / "ck" / "last.ckpt"
    m2 = BackdoorClassifier.load_from_checkpoint(path, net=TinyResNet(width=4), weights_only=True)
    assert isinstance(m2.batch_attack, IAD)
    dm2 = BackdoorDataModule.from_checkpoint(path)
    assert isinstance(dm2.attack, IAD) and isinstance(dm2.test_poisoned, DeviceTriggerSet)
    assert torch.equal(dm2.attack.trigger(clean), m.batch_attack.trigger(clean))
    res2 = trainer(tmp_path / "t2").test(m2, dm2)
    assert res2[1]["test/asr"] == asr and res2[0]["test/ba"] == res[0]["test/ba"]


def test_classifier_batch_attack_argument_with_a_clean_data_module(tmp_path):
    attack = iad(mask_pretrain_steps=0)
    dm, m = small_dm(None), module(batch_attack=attack)
    t = trainer(tmp_path, limit_val_batches=1)
    t.fit(m, dm)
    assert dm.attack is attack and isinstance(dm.val_poisoned, DeviceTriggerSet)
    assert "val/asr" in t.callback_metrics


# -- bad input -----------------------------------------------------------------------------------
def test_shares_must_leave_clean_samples():
    with pytest.raises(ValueError, match=r"backdoor_share \+ cross_share must be < 1"):
        IAD(backdoor_share=0.6, cross_share=0.4)


def test_generator_output_shape_must_match_the_input():
    attack = IAD(pattern_generator=nn.Conv2d(1, 2, 1), hidden=4).build(1, 8, 8)
    with pytest.raises(ValueError, match=r"pattern_generator must return a tensor shaped like its input"):
        attack.poison_batch(torch.rand(4, 1, 8, 8), torch.arange(4), 0)
    attack = IAD(mask_generator=nn.Sequential(nn.Conv2d(1, 1, 3), nn.Sigmoid()), hidden=4).build(1, 8, 8)
    with pytest.raises(ValueError, match=r"mask_generator must return a tensor shaped like its input"):
        attack.trigger(torch.rand(4, 1, 8, 8))


def test_dataset_attack_and_batch_attack_together_are_refused(tmp_path):
    dm, m = small_dm(BadNets()), module(batch_attack=iad())
    with pytest.raises(ValueError, match="use one of them"):
        trainer(tmp_path).fit(m, dm)


# -- contract over the registry ------------------------------------------------------------------
@pytest.mark.parametrize("name", list_batch_attacks())
def test_batch_attack_contract(name):
    """Every registered batch attack: shapes, pixel space, labels, masks, device, and its state restores the trigger."""
    attack = create_batch_attack(name, seed=0).build(1, 12, 12)
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(16, 1, 12, 12, generator=g), torch.randint(1, 10, (16,), generator=g)
    x0 = x.clone()
    out = attack.poison_batch(x, y, 0)
    assert torch.equal(x, x0)  # the batch is not modified in place
    assert out.x.shape == x.shape and out.y.shape == y.shape and out.x.device == x.device
    assert float(out.x.min()) >= 0 and float(out.x.max()) <= 1
    assert bool((out.y[out.poisoned] == 0).all()) and torch.equal(out.y[~out.poisoned], y[~out.poisoned])
    assert not bool((out.poisoned & out.cross).any()) and 0 < int(out.poisoned.sum()) < len(x)
    xt = attack.trigger(x)
    assert xt.shape == x.shape and not xt.requires_grad
    fresh = create_batch_attack(name, seed=1)
    fresh.load_state_dict(attack.state_dict())
    assert torch.equal(fresh.trigger(x), xt)
    assert all(o.phase in ("train", "pretrain") for o in attack.configure_optimizers())
