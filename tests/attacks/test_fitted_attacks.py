"""Fitted attacks (Label-Consistent, TUAP, NARCISSUS, ISSBA): formulas against independent re-computations,
the clean-label path through the data module, seeding, surrogates, and exact rebuilds from checkpoints."""

import io

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import TensorDataset

from tiny_attacks import TINY, make_tiny, tiny_data
from tiny_net import TinyResNet
from lightning_backdoor import BackdoorClassifier, BackdoorDataModule
from lightning_backdoor.attacks import ISSBA, TUAP, LabelConsistent, Narcissus, steganography
from lightning_backdoor.attacks.adversarial import pgd_untargeted, universal_perturbation
from lightning_backdoor.attacks.clean_label import checkerboard, corner_trigger
from lightning_backdoor.checkpoints import safe_load
from lightning_backdoor.models import SmallCNN

FITTED = list(TINY)
CLEAN_LABEL = ["label_consistent", "tuap", "narcissus"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def small_dm(name, seed=0, rate=0.02, **attack_kw):
    return BackdoorDataModule("mnist5k", attack=make_tiny(name, **attack_kw), target=3, rate=rate, seed=seed,
                              val_size=60, defense_size=60, test_size=60, batch_size=32, eval_batch_size=60)


def surrogate_net(c=1, seed=0):
    torch.manual_seed(seed)
    return SmallCNN(num_classes=10, in_channels=c, width=4).eval()


# -- the functional core -------------------------------------------------------------------------
def test_pgd_stays_in_eps_ball_and_range_and_raises_the_loss():
    net = surrogate_net(3)
    x = torch.rand(6, 3, 12, 12)
    x[:, :, :3] = 0.0  # pixels at the range ends, where the box constraint binds
    x[:, :, -3:] = 1.0
    y = torch.arange(6) % 10
    eps = 8 / 255
    xa = pgd_untargeted(net, x, y, eps, 1.5 / 255, 10, batch_size=4)  # two batches
    assert (xa - x).abs().max() <= eps + 1e-6 and xa.min() >= 0 and xa.max() <= 1
    assert (xa - x).abs().max() > eps / 2
    with torch.no_grad():
        assert F.cross_entropy(net(xa), y) > F.cross_entropy(net(x), y)
    # batching does not change the result (each image's PGD is independent)
    torch.testing.assert_close(pgd_untargeted(net, x, y, eps, 1.5 / 255, 10, batch_size=6), xa)


def test_universal_perturbation_is_bounded_and_pulls_towards_the_target():
    net = surrogate_net(1)
    x = torch.rand(16, 1, 12, 12)
    d = universal_perturbation(net, x, target=4, eps=0.1, step_size=0.02, epochs=5, batch_size=8,
                               generator=torch.Generator().manual_seed(0))
    assert d.shape == (1, 12, 12) and d.abs().max() <= 0.1 + 1e-6
    with torch.no_grad():
        p0 = net(x).softmax(1)[:, 4].mean()
        p1 = net((x + d).clamp(0, 1)).softmax(1)[:, 4].mean()
    assert p1 > p0


def test_corner_trigger_formula():
    x = torch.rand(2, 3, 8, 8)
    out = corner_trigger(x, 3, 0.25)
    sign = 2 * checkerboard(3) - 1
    torch.testing.assert_close(out[:, :, 5:, 5:], (x[:, :, 5:, 5:] + 0.25 * sign).clamp(0, 1))
    assert torch.equal(out[:, :, :5], x[:, :, :5]) and torch.equal(out[:, :, :, :5], x[:, :, :, :5])
    full = corner_trigger(x, 3, 1.0, all_corners=True)
    for rows, cols in ((slice(0, 3), slice(0, 3)), (slice(0, 3), slice(5, 8)), (slice(5, 8), slice(0, 3))):
        assert set(full[:, :, rows, cols].unique().tolist()) <= {0.0, 1.0}


# -- the clean-label path through the data module ------------------------------------------------
@pytest.mark.parametrize("name", CLEAN_LABEL)
def test_clean_label_attacks_touch_only_target_class_and_keep_labels(name):
    dm = small_dm(name)
    dm.setup()
    ts = dm.train_set
    labels = ts.labels
    assert len(ts.poison_indices) == round(0.02 * len(labels))
    assert bool((labels[ts.poison_indices] == 3).all())
    for i in range(0, len(ts), 97):
        s = ts[i]
        assert s.y == s.original_y  # never relabelled
        clean = ts.dataset[s.index][0]
        if s.poisoned:
            assert s.original_y == 3 and not torch.equal(s.x, clean)
        elif dm.augment is False:
            assert torch.equal(s.x, clean)
    for i in ts.poison_indices[:3].tolist():
        assert ts[i].y == 3 and ts[i].poisoned
    assert 0 <= dm.backdoor_info()["attack_fit"]["surrogate_train_acc"] <= 1  # recorded with the run
    # the ASR set: non-target test images, triggered, labelled with the target
    s = dm.test_poisoned[0]
    assert s.y == 3 and s.original_y != 3


def test_label_consistent_images_are_pgd_plus_trigger_of_the_given_surrogate():
    net = surrogate_net(1)
    w0 = {k: v.clone() for k, v in net.state_dict().items()}
    dm = BackdoorDataModule("mnist5k", attack=LabelConsistent(steps=3, surrogate=net), target=3, rate=0.01,
                            val_size=60, defense_size=60, test_size=60, augment=False)
    dm.setup()
    a, ts = dm.attack, dm.train_set
    assert all(torch.equal(v, w0[k]) for k, v in net.state_dict().items())  # a given surrogate is not trained
    assert torch.equal(a.sample_index, ts.poison_indices) and a.sample_images.dtype == torch.uint8
    assert a.sample_images.shape == (len(ts.poison_indices), 1, 28, 28)
    assert "surrogate" not in "".join(a.state_dict())  # the surrogate is not trigger state
    x = torch.stack([ts.dataset[i][0] for i in ts.poison_indices.tolist()])
    x_adv = pgd_untargeted(net, x, torch.full((len(x),), 3), a.eps, a.step_size, a.steps)
    expected = (corner_trigger(x_adv, 3, 1.0) * 255).round().to(torch.uint8)
    assert (expected.int() - a.sample_images.int()).abs().max() <= 1  # float rounding at .5
    got = torch.stack([ts[i].x for i in ts.poison_indices.tolist()])
    inside = torch.ones(28, 28, dtype=torch.bool)
    inside[-3:, -3:] = False
    assert (got - x)[:, :, inside].abs().max() <= a.eps + 1e-6  # the eps-ball outside the trigger
    assert got.min() >= 0 and got.max() <= 1
    # test-time trigger: the corner pattern only
    s = dm.test_poisoned[0]
    torch.testing.assert_close(s.x, corner_trigger(dm.test_poisoned.dataset[s.index][0][None], 3, 1.0)[0])


def test_narcissus_amplifies_at_test_time_only():
    dm = small_dm("narcissus")
    dm.setup()
    a = dm.attack
    d = a.delta
    assert d.abs().max() <= a.eps + 1e-6
    i = int(dm.train_set.poison_indices[0])
    clean = dm.train_set.dataset[i][0]
    assert torch.allclose(a.poison_train(clean, i), (clean + d).clamp(0, 1))
    s = dm.test_poisoned[0]
    torch.testing.assert_close(s.x, (dm.test_poisoned.dataset[s.index][0] + 3 * d).clamp(0, 1))


def test_issba_triggers_are_sample_specific_encoder_outputs():
    dm = small_dm("issba", rate=0.01)
    dm.setup()
    a, ts = dm.attack, dm.train_set
    assert a.dirty_label and bool((ts.labels[ts.poison_indices] != 3).all())
    x = torch.stack([ts.dataset[i][0] for i in ts.poison_indices.tolist()])
    params = {k: getattr(a, k) for k in steganography.PARAM_KEYS}
    expected = steganography.encode(x, a.code, params, a.max_residual)
    assert (to_u8(expected).int() - a.sample_images.int()).abs().max() <= 1
    res = expected - x
    assert res.abs().max() <= a.max_residual + 1e-6
    assert not torch.allclose(res[0], res[1])  # a different trigger per image
    # the test set's triggers: computed in batches, equal to the encoder applied image by image
    test = dm.test_poisoned
    for j in (0, len(test) - 1):
        s = test[j]
        one = a(test.dataset[s.index][0])
        assert (to_u8(one).int() - to_u8(s.x).int()).abs().max() <= 1


def to_u8(x):
    return (x.clamp(0, 1) * 255).round().to(torch.uint8)


def test_issba_code_is_used_and_checked():
    a = ISSBA(code_bits=6, code="101", hidden=4, epochs=1, samples=16).fit(tiny_data((1, 8, 8)), 0)
    assert a.code.tolist() == [1, 0, 1, 0, 0, 0] and a.hparams()["code"] == "101"
    with pytest.raises(ValueError, match="code has 5 bits but the encoder hides code_bits=4"):
        ISSBA(code_bits=4, code="10110")
    with pytest.raises(ValueError, match="code_bits=65 is longer than the encoder supports.*at most 64 bits"):
        ISSBA(code_bits=65)


# -- seeding -------------------------------------------------------------------------------------
def _fitted_state(attack):
    return {k: v.clone() for k, v in attack.state_dict().items()}


@pytest.mark.parametrize("name", FITTED)
def test_fit_is_seeded_and_leaves_the_global_rng(name):
    data = tiny_data((1, 12, 12), n=32)
    rng = torch.get_rng_state()
    a = make_tiny(name, seed=1).fit(data, 1, indices=[1, 5, 9])
    assert torch.equal(torch.get_rng_state(), rng)
    b = make_tiny(name, seed=1).fit(data, 1, indices=[1, 5, 9])
    c = make_tiny(name, seed=2).fit(data, 1, indices=[1, 5, 9])
    sa, sb, sc = _fitted_state(a), _fitted_state(b), _fitted_state(c)
    assert set(sa) == set(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa if sa[k].is_floating_point() or sa[k].dtype == torch.uint8)
    # idempotent: a fitted attack asked again for the same indices keeps its state
    a.fit(data, 1, indices=[1, 5, 9])
    assert all(torch.equal(v, sa[k]) for k, v in a.state_dict().items())


@pytest.mark.parametrize("name", FITTED)
def test_fitted_state_round_trips_through_weights_only(name):
    data = tiny_data((1, 12, 12), n=32)
    a = make_tiny(name).fit(data, 1, indices=[1, 5])
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    b = make_tiny(name, seed=5)
    b.load_state_dict(torch.load(buf, weights_only=True))
    assert b.fitted
    x = data.tensors[0][:4]
    assert torch.equal(b(x), a(x))
    assert torch.equal(b.poison_train(x[1], 1), a.poison_train(x[1], 1))
    b.fit(data, 1, indices=[1, 5])  # restored state: no refit
    assert torch.equal(b(x), a(x))


# -- surrogates ----------------------------------------------------------------------------------
def test_surrogate_from_a_weights_file_is_loaded_safely(tmp_path):
    data = tiny_data((1, 12, 12), n=32)
    net = SmallCNN(num_classes=4, in_channels=1, width=4)
    torch.save(net.state_dict(), tmp_path / "sur.pt")
    a = TUAP(epochs=1, samples=16, surrogate=str(tmp_path / "sur.pt"), surrogate_width=4).fit(data, 1)
    b = TUAP(epochs=1, samples=16, surrogate=net.eval()).fit(data, 1)
    assert torch.equal(a.delta, b.delta)  # the same weights give the same perturbation
    c = TUAP(epochs=1, samples=16, surrogate="small_cnn", surrogate_weights=str(tmp_path / "sur.pt"),
             surrogate_epochs=0)
    with pytest.raises(ValueError, match="does not match the model"):  # small_cnn's default width is 32
        c.fit(data, 1)
    torch.save({"net": torch.nn.Linear(2, 2)}, tmp_path / "unsafe.pt")
    from lightning_backdoor.checkpoints import UnsafeCheckpointError

    with pytest.raises(UnsafeCheckpointError):
        TUAP(surrogate=str(tmp_path / "unsafe.pt")).fit(data, 1)


def test_surrogate_that_does_not_fit_the_data_is_refused():
    data = tiny_data((1, 12, 12), n=32, num_classes=4)
    with pytest.raises(ValueError, match="surrogate takes 3-channel images but the data has 1 channels"):
        Narcissus(surrogate=SmallCNN(num_classes=4, in_channels=3, width=4)).fit(data, 1)
    with pytest.raises(ValueError, match="surrogate outputs 2 logits but the data has 4 classes"):
        LabelConsistent(surrogate=SmallCNN(num_classes=2, in_channels=1, width=4)).fit(data, 1)
    no_attr = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 12 * 12, 4))
    with pytest.raises(ValueError, match="surrogate cannot take the data's 1x12x12 images"):
        TUAP(surrogate=no_attr).fit(data, 1)


def test_clean_label_fit_without_target_samples():
    data = TensorDataset(torch.rand(8, 1, 8, 8), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1]))
    with pytest.raises(ValueError, match="no samples of the target class 3"):
        LabelConsistent(**TINY["label_consistent"]).fit(data, 3)


# -- checkpoints: resume and from_checkpoint rebuild the same poisoned sets -----------------------
def _trainer(tmp_path, **kw):
    args = dict(max_epochs=1, limit_train_batches=2, limit_val_batches=0, accelerator="cpu", devices=1,
                logger=False, enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                default_root_dir=str(tmp_path), deterministic=True)
    args.update(kw)
    return L.Trainer(**args)


def _items(ds, positions):
    return [ds[int(i)] for i in positions]


@pytest.mark.parametrize("name", FITTED)
def test_from_checkpoint_rebuilds_the_same_poisoned_sets(name, tmp_path, monkeypatch):
    L.seed_everything(0)
    dm = small_dm(name)
    module = BackdoorClassifier(TinyResNet(), optimizer=lambda p: torch.optim.SGD(p, lr=0.01))
    _trainer(tmp_path, callbacks=[ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)]).fit(module, dm)
    path = tmp_path / "ckpt" / "last.ckpt"
    ckpt = torch.load(path, weights_only=True)  # loadable safely
    state = ckpt["BackdoorDataModule"]["attack_state"]
    n_poison = len(dm.train_set.poison_indices)
    extra = sum(v.numel() * v.element_size() for k, v in state.items() if k != "sample_images")
    if dm.attack.per_sample:
        assert state["sample_images"].dtype == torch.uint8
        assert state["sample_images"].numel() == n_poison * 28 * 28  # the poisoned subset as uint8, no more
    assert extra < 64_000  # indices, the trigger (delta, code, a tiny encoder): small


    def no_refit(*args, **kwargs):
        raise AssertionError("from_checkpoint must reuse the fitted state, not fit again")

    monkeypatch.setattr(type(dm.attack), "_fit", no_refit)
    rebuilt = BackdoorDataModule.from_checkpoint(path, augment=False)
    assert type(rebuilt.attack) is type(dm.attack) and rebuilt.attack is not dm.attack
    assert torch.equal(rebuilt.train_set.poison_indices, dm.train_set.poison_indices)
    dm.train_set.transform = None
    for a, b in zip(_items(rebuilt.train_set, dm.train_set.poison_indices[:4]),
                    _items(dm.train_set, dm.train_set.poison_indices[:4])):
        assert torch.equal(a.x, b.x) and a.y == b.y and a.index == b.index
    for j in (0, len(dm.test_poisoned) - 1):
        assert torch.equal(rebuilt.test_poisoned[j].x, dm.test_poisoned[j].x)


def test_resume_restores_the_checkpoints_per_sample_images(tmp_path):
    """Resuming with a data module whose attack fits differently still trains on the checkpoint's images."""
    L.seed_everything(0)
    dm = small_dm("label_consistent")
    module = BackdoorClassifier(TinyResNet(), optimizer=lambda p: torch.optim.SGD(p, lr=0.01))
    _trainer(tmp_path, callbacks=[ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)]).fit(module, dm)
    saved = safe_load(tmp_path / "ckpt" / "last.ckpt")["BackdoorDataModule"]["attack_state"]["sample_images"]
    probe = small_dm("label_consistent", surrogate_width=5)  # another surrogate: other PGD images when fitted
    probe.setup()
    assert not torch.equal(probe.attack.sample_images, saved)
    other = small_dm("label_consistent", surrogate_width=5)
    module2 = BackdoorClassifier(TinyResNet(), optimizer=lambda p: torch.optim.SGD(p, lr=0.01))
    _trainer(tmp_path, max_epochs=2).fit(module2, other, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert torch.equal(other.attack.sample_images, saved)
    assert torch.equal(other.attack.sample_images, dm.attack.sample_images)


def test_surrogate_module_and_weights_are_expressible_in_yaml(tmp_path, monkeypatch):
    """LightningCLI builds a given surrogate from class_path/init_args and keeps surrogate_weights as a path."""
    import contextlib
    import sys
    from pathlib import Path

    import yaml

    from lightning_backdoor.cli import main

    monkeypatch.setattr(sys, "argv", ["lightning-backdoor"])
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.chdir(tmp_path)
    quickstart = Path(__file__).resolve().parents[2] / "configs" / "quickstart.yaml"
    attack = {"class_path": "lightning_backdoor.attacks.LabelConsistent",
              "init_args": {"steps": 5, "surrogate": {"class_path": "lightning_backdoor.models.SmallCNN",
                                                      "init_args": {"in_channels": 1, "width": 4}},
                            "surrogate_weights": "sur.pt"}}
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        main(["fit", "--config", str(quickstart), "--data.init_args.attack", yaml.safe_dump(attack),
              "--print_config"])
    printed = yaml.safe_load(out.getvalue())["data"]["init_args"]["attack"]["init_args"]
    assert printed["surrogate"]["class_path"].endswith("SmallCNN") and printed["surrogate"]["init_args"]["width"] == 4
    assert printed["surrogate_weights"] == "sur.pt" and printed["steps"] == 5


def test_restoring_the_state_recomputes_per_sample_evaluation_triggers():
    dm = small_dm("issba", rate=0.01)
    dm.setup()
    other = small_dm("issba", rate=0.01, lr=0.02)  # trains another encoder in its own setup
    other.setup()
    assert not torch.equal(other.test_poisoned[0].x, dm.test_poisoned[0].x)
    other.load_state_dict(dm.state_dict())  # as Lightning does on resume, after setup
    for j in (0, len(dm.test_poisoned) - 1):
        assert torch.equal(other.test_poisoned[j].x, dm.test_poisoned[j].x)
        assert torch.equal(other.val_poisoned[j].x, dm.val_poisoned[j].x)
