"""PhysicalBA, BATT, Adap-Blend, Adap-Patch: formulas against independent re-computations, train- vs test-time
triggers, the data pipeline's poison/cover/clean handling, seeded determinism and exact resume."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from tiny_net import TinyResNet
from lightning_backdoor import BackdoorClassifier, BackdoorDataModule
from lightning_backdoor.attacks import BATT, AdaptiveBlend, AdaptivePatch, BadNets, PhysicalBA, functional as AF

NEW = ["physical_ba", "batt", "adaptive_patch", "adaptive_blend"]
SHAPES = [(1, 28, 28), (3, 32, 32), (3, 24, 40), (1, 31, 17)]


def _rand(*shape, seed=0, dtype=torch.float32):
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def gen(seed):
    return torch.Generator().manual_seed(seed)


# -- functional core vs torchvision --------------------------------------------------------------
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("angle", [16.0, -16.0, 45.0, 90.0])
def test_batt_rotation_equals_torchvision(shape, angle):
    x = _rand(3, *shape)
    out = BATT(angle=angle)(x)
    ref = TF.rotate(x, angle, interpolation=InterpolationMode.BILINEAR)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
    assert not torch.allclose(out, x, atol=1e-3)


def test_affine_equals_torchvision_affine_with_opposite_angle():
    x = _rand(2, 3, 24, 40)
    out = AF.affine(x, angle=10.0, scale=0.8, translate=(2.0, -3.0))
    ref = TF.affine(x, angle=-10.0, translate=[2, -3], scale=0.8, shear=[0.0, 0.0],
                    interpolation=InterpolationMode.BILINEAR)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
    # per-sample parameters equal one call per sample
    angles, flips = torch.tensor([5.0, -20.0]), torch.tensor([True, False])
    both = AF.affine(x, angle=angles, hflip=flips)
    for i in range(2):
        torch.testing.assert_close(both[i:i + 1], AF.affine(x[i:i + 1], angle=float(angles[i]), hflip=bool(flips[i])))
    torch.testing.assert_close(AF.affine(x, hflip=True), x.flip(-1), rtol=0, atol=1e-5)


@pytest.mark.parametrize("dx, dy", [(3, 3), (-2, 5), (0, -4)])
def test_batt_translation_is_an_exact_shift(dx, dy):
    x = _rand(2, 1, 10, 12)
    out = BATT(transform="translate", shift=(dx, dy))(x)
    ref = torch.zeros_like(x)
    for r in range(10):
        for c in range(12):
            if 0 <= r - dy < 10 and 0 <= c - dx < 12:
                ref[:, :, r, c] = x[:, :, r - dy, c - dx]
    assert torch.equal(out, ref)


def test_batt_clean_images_get_mild_rotations_of_the_same_kind():
    a = BATT(angle=16.0, clean_strength=0.5, clean_p=1.0)
    x = _rand(6, 1, 28, 28)
    out = a.clean_train_transform(x, gen(3))
    u = torch.rand((6, 3), generator=gen(3), dtype=torch.float64)  # the documented draw: apply, angle, (unused)
    angles = (u[:, 1] * 2 - 1) * 8.0
    assert bool((angles.abs() <= 8.0).all())
    for i in range(6):
        ref = TF.rotate(x[i:i + 1], float(angles[i]), interpolation=InterpolationMode.BILINEAR)
        torch.testing.assert_close(out[i:i + 1], ref, rtol=0, atol=1e-5)
    # share clean_p, identity without jitter, the trigger never produced for clean images
    some = BATT(clean_p=0.5).clean_train_transform(_rand(400, 1, 8, 8), gen(0))
    changed = (some != _rand(400, 1, 8, 8)).flatten(1).any(1).float().mean()
    assert 0.4 < changed < 0.6
    assert torch.equal(BATT(clean_strength=0.0).clean_train_transform(x, gen(0)), x)
    assert torch.equal(BATT(clean_p=0.0).clean_train_transform(x, gen(0)), x)


# -- train-time triggers are a part of the test-time one ----------------------------------------
def _support(out, x):
    return out != x


@pytest.mark.parametrize("make", [
    lambda: AdaptiveBlend(seed=1),                                   # defaults: 8 of 16 pieces at 0.15, test 0.2
    lambda: AdaptiveBlend(alpha=0.2, train_alpha=0.2, pieces=(3, 5), train_pieces=4, seed=2),
    lambda: AdaptivePatch(seed=1),                                   # 2 of 4 patches
    lambda: AdaptivePatch(patch_size=(2, 3), num_patches=5, train_patches=3, alpha=0.7, train_alpha=0.7, seed=3),
], ids=["blend-default", "blend-equal-alpha", "patch-default", "patch-partial-alpha"])
@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 24, 40)])
def test_adaptive_train_trigger_is_a_subset_of_the_test_trigger(make, shape):
    a = make()
    x = _rand(16, *shape)
    test = a(x)
    same_alpha = a.train_alpha == a.alpha
    for seed in range(4):
        train = a.train_trigger(x, gen(seed))
        inside = _support(train, x)
        assert inside.any(dim=(1, 2, 3)).all()                       # every training sample carries a part
        assert not (inside & ~_support(test, x)).any()               # ... and only a part of the test trigger
        assert (inside.flatten(1).sum(1) < _support(test, x).flatten(1).sum(1)).all()
        if same_alpha:
            assert torch.equal(train[inside], test[inside])          # equal where the training trigger acts
        else:  # the training opacity: x + a_train (p - x) on the chosen pieces
            pattern = AF.resize_pattern(a.pattern, *shape[-2:]).expand_as(x)
            ref = ((1 - a.train_alpha) * x + a.train_alpha * pattern).clamp(0, 1)
            torch.testing.assert_close(train[inside], ref[inside])
        cover = a.cover(x, generator=gen(seed))
        assert torch.equal(cover, train)                             # cover samples: the training-time trigger


def test_adaptive_blend_applies_exactly_train_pieces_cells():
    a = AdaptiveBlend(pieces=16, train_pieces=8, seed=0)
    x = _rand(10, 1, 28, 28)
    train = a.train_trigger(x, gen(0))
    cells = AF.grid_cells(28, 28, 4, 4)
    for i in range(10):
        changed = {int(c) for c in cells[(train[i, 0] != x[i, 0])].unique()}
        assert len(changed) == 8
    # the test-time trigger: Blended's formula with the seeded noise pattern
    torch.testing.assert_close(a(x), 0.8 * x + 0.2 * AF.seeded_rand((1, 28, 28), 0))


def test_adaptive_patch_places_non_overlapping_patches():
    a = AdaptivePatch(patch_size=3, num_patches=6, seed=0).build(1, 28, 28)
    x = torch.zeros(1, 1, 28, 28)
    out = a(x)
    assert int((out != 0).sum()) == 6 * 9  # no overlap (noise values are never exactly 0)
    for j in range(6):
        r, c = a.locations[j].tolist()
        assert torch.equal(out[0, :, r:r + 3, c:c + 3], a.patches[j])


# -- PhysicalBA ----------------------------------------------------------------------------------
def test_physical_ba_test_trigger_with_and_without_transforms():
    x = _rand(4, 3, 32, 32)
    a = PhysicalBA(seed=2)
    plain = BadNets(seed=2)(x)
    assert torch.equal(a(x), plain) and torch.equal(a.test_trigger(x, transforms=False), plain)
    moved = a.test_trigger(x, transforms=True)
    assert not torch.equal(moved, plain)
    assert torch.equal(moved, a.test_trigger(x, transforms=True))            # deterministic per image
    assert torch.equal(moved[1], a.test_trigger(x[1], transforms=True))      # and independent of the batch
    b = PhysicalBA(seed=2, test_transforms=True)
    assert torch.equal(b(x), moved) and torch.equal(b.test_trigger(x, transforms=False), plain)


def test_physical_ba_train_trigger_transforms_the_stamped_image():
    x = _rand(8, 3, 32, 32)
    plain = BadNets(seed=0)(x)
    off = dict(degrees=0.0, scale=1.0, flip_p=0.0, brightness=0.0, contrast=0.0)
    with pytest.warns(UserWarning, match="every transform is off"):
        assert torch.equal(PhysicalBA(**off).train_trigger(x, gen(0)), plain)
    flipped = PhysicalBA(**{**off, "flip_p": 1.0}).train_trigger(x, gen(0))
    torch.testing.assert_close(flipped, plain.flip(-1), rtol=0, atol=1e-5)
    bright = PhysicalBA(**{**off, "brightness": 0.3}).train_trigger(x, gen(5))
    u = torch.rand((8, 7), generator=gen(5), dtype=torch.float64)
    factors = (1 + (u[:, 5] * 2 - 1) * 0.3).float().view(8, 1, 1, 1)
    torch.testing.assert_close(bright, (plain * factors).clamp(0, 1))
    rotated = PhysicalBA(**{**off, "degrees": 30.0}).train_trigger(x, gen(6))
    u = torch.rand((8, 7), generator=gen(6), dtype=torch.float64)
    for i in range(8):
        ref = TF.rotate(plain[i:i + 1], float((u[i, 0] * 2 - 1) * 30.0), interpolation=InterpolationMode.BILINEAR)
        torch.testing.assert_close(rotated[i:i + 1], ref, rtol=0, atol=1e-5)
    # shrink-and-pad: the content shrinks, a zero border appears
    shrunk = PhysicalBA(**{**off, "scale": (0.5, 0.5)}).train_trigger(torch.ones(2, 1, 16, 16), gen(0))
    assert float(shrunk.mean()) == pytest.approx(0.25, abs=0.07)


# -- the data pipeline ---------------------------------------------------------------------------
def _dm(attack, rate=0.1, seed=0, **kw):
    dm = BackdoorDataModule("mnist5k", attack=attack, target=0, rate=rate, seed=seed, val_size=100,
                            defense_size=50, test_size=200, batch_size=32, eval_batch_size=100, **kw)
    dm.setup("fit")
    return dm


@pytest.mark.parametrize("make, cover_ratio", [(lambda: AdaptiveBlend(seed=0), 1.0),
                                               (lambda: AdaptivePatch(seed=0), 2.0)])
def test_adaptive_counts_labels_and_train_time_triggers_in_the_data_module(make, cover_ratio):
    dm = _dm(make(), rate=0.01)
    ts = dm.train_set
    n = len(ts.labels)
    assert len(ts.poison_indices) == round(0.01 * n)                         # a share of the whole training set
    assert len(ts.cover_indices) == round(cover_ratio * len(ts.poison_indices))
    assert not set(ts.poison_indices.tolist()) & set(ts.cover_indices.tolist())
    info = dm.backdoor_info()
    assert info["num_poisoned"] == len(ts.poison_indices) and info["num_cover"] == len(ts.cover_indices)
    base = ts.dataset
    for i in ts.poison_indices[:3].tolist():
        s = ts[i]
        clean = base[i][0]
        assert s.y == 0 and s.poisoned and s.original_y == int(ts.labels[i])
        assert torch.equal(s.x, dm.attack.train_trigger(clean, ts._sample_generator(i)))
        assert not torch.equal(s.x, dm.attack(clean))                          # not the full test trigger
        assert torch.equal(ts[i].x, s.x)                                      # the same draw every epoch
    for i in ts.cover_indices[:3].tolist():
        s = ts[i]
        assert s.y == int(ts.labels[i]) and not s.poisoned and not torch.equal(s.x, base[i][0])
    j = next(k for k in range(n) if not ts._poison_mask[k] and not ts._cover_mask[k])
    assert torch.equal(ts[j].x, base[j][0])                                   # clean samples untouched
    # evaluation sets get the full test-time trigger
    s = dm.test_poisoned[0]
    assert torch.equal(s.x, dm.attack(dm.test_poisoned.dataset[int(s.index)][0]))


def test_batt_clean_hook_only_on_clean_training_samples():
    dm = _dm(BATT(clean_p=1.0))
    ts = dm.train_set
    base = ts.dataset
    clean = [k for k in range(200) if not ts._poison_mask[k]][:5]
    for k in clean:
        assert not torch.equal(ts[k].x, base[k][0]) and torch.equal(ts[k].x, ts[k].x)
        assert ts[k].y == int(ts.labels[k])
    k = int(ts.poison_indices[0])
    torch.testing.assert_close(ts[k].x, TF.rotate(base[k][0], 16.0, interpolation=InterpolationMode.BILINEAR),
                               rtol=0, atol=1e-5)
    assert dm.val_clean[0].x.equal(dm.val_clean.dataset[0][0])                # evaluation sets stay clean


@pytest.mark.parametrize("name", NEW)
def test_new_attacks_poisoned_sets_are_seeded_and_ignore_the_global_rng(name):
    from lightning_backdoor.attacks import create_attack

    torch.manual_seed(1)
    a = _dm(create_attack(name, seed=0))
    torch.manual_seed(2)
    b = _dm(create_attack(name, seed=0))
    assert torch.equal(a.train_set.poison_indices, b.train_set.poison_indices)
    assert torch.equal(a.train_set.cover_indices, b.train_set.cover_indices)
    picks = (a.train_set.poison_indices[:4].tolist() + a.train_set.cover_indices[:2].tolist() + list(range(4)))
    for i in picks:
        assert torch.equal(a.train_set[i].x, b.train_set[i].x), i
    c = _dm(create_attack(name, seed=0), seed=1)  # another poison seed: other samples, other draws
    assert not torch.equal(a.train_set.poison_indices, c.train_set.poison_indices)


# -- exact resume ----------------------------------------------------------------------------------
def _run(tmp_path, name, ckpt=None, max_epochs=2, callbacks=()):
    from lightning_backdoor.attacks import create_attack

    L.seed_everything(0 if ckpt is None else 123, workers=True)
    torch.manual_seed(0)
    dm = BackdoorDataModule("mnist5k", attack=create_attack(name, seed=0), target=0, rate=0.05, seed=0,
                            val_size=40, defense_size=10, test_size=40, batch_size=32, eval_batch_size=40)
    module = BackdoorClassifier(TinyResNet(width=4), optimizer=lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9))
    t = L.Trainer(max_epochs=max_epochs, limit_train_batches=3, limit_val_batches=1, accelerator="cpu", devices=1,
                  deterministic=True, logger=False, enable_progress_bar=False, enable_model_summary=False,
                  num_sanity_val_steps=0, default_root_dir=str(tmp_path), callbacks=list(callbacks),
                  enable_checkpointing=bool(callbacks))
    t.fit(module, dm, ckpt_path=ckpt)
    return module, dm


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("name", NEW)
def test_new_attacks_resume_exactly(name, tmp_path):
    reference, _ = _run(tmp_path / "ref", name)
    _run(tmp_path / "a", name, max_epochs=1, callbacks=[ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)])
    resumed, dm = _run(tmp_path / "b", name, ckpt=str(tmp_path / "ckpt" / "last.ckpt"))
    for k, v in reference.state_dict().items():
        assert torch.equal(resumed.state_dict()[k], v), k
    rebuilt = BackdoorDataModule.from_checkpoint(tmp_path / "ckpt" / "last.ckpt")
    assert type(rebuilt.attack) is type(dm.attack) and rebuilt.attack.hparams() == dm.attack.hparams()
    for i in rebuilt.train_set.poison_indices[:3].tolist() + rebuilt.train_set.cover_indices[:2].tolist():
        assert torch.equal(rebuilt.train_set[i].x, dm.train_set[i].x)
    assert torch.equal(rebuilt.test_poisoned[0].x, dm.test_poisoned[0].x)


# -- bad parameters ------------------------------------------------------------------------------
@pytest.mark.parametrize("make, exc, match", [
    (lambda: BATT(angle=0), ValueError, "angle=0 is a whole turn.*identity"),
    (lambda: BATT(angle=360.0), ValueError, "identity"),
    (lambda: BATT(angle=400.0), ValueError, "0 < \\|angle\\| < 360"),
    (lambda: BATT(transform="translate", shift=(0, 0)), ValueError, "shift=\\(0, 0\\) would make the trigger"),
    (lambda: BATT(transform="translate", shift=(2.5, 1)), TypeError, "shift must be a \\(dx, dy\\) pair of ints"),
    (lambda: BATT(transform="translate", shift=(28, 0)).build(1, 28, 28), ValueError, "out of the frame"),
    (lambda: BATT(transform="shear"), ValueError, "transform must be one of"),
    (lambda: BATT(clean_strength=1.0), ValueError, "clean_strength must be in \\[0, 1\\)"),
    (lambda: AdaptiveBlend(pieces=15), ValueError, "pieces=15 is not a square number"),
    (lambda: AdaptiveBlend(pieces=(40, 2)).build(1, 28, 28), ValueError, "more pieces than it has pixels"),
    (lambda: AdaptiveBlend(train_pieces=17), ValueError, "train_pieces=17 is more than the 16 pieces"),
    (lambda: AdaptiveBlend(train_pieces=0), ValueError, "train_pieces must be >= 1"),
    (lambda: AdaptiveBlend(train_alpha=0.0), ValueError, "train_alpha must be in \\(0, 1\\]"),
    (lambda: AdaptiveBlend(cover_ratio=-1), ValueError, "cover_ratio must be >= 0"),
    (lambda: AdaptivePatch(num_patches=1), ValueError, "num_patches must be >= 2"),
    (lambda: AdaptivePatch(num_patches=4, train_patches=5), ValueError, "train_patches=5 is more than num_patches=4"),
    (lambda: AdaptivePatch(patch_size=4, num_patches=5).build(1, 8, 8), ValueError, "do not fit side by side"),
    (lambda: AdaptivePatch(patch_size=3, num_patches=10).build(1, 8, 8), ValueError, "more trigger pixels"),
    (lambda: PhysicalBA(degrees=200), ValueError, "degrees must be in \\[0, 180\\]"),
    (lambda: PhysicalBA(scale=(0.9, 0.8)), ValueError, "0 < low <= high <= 1"),
    (lambda: PhysicalBA(scale=1.5), ValueError, "0 < low <= high <= 1"),
    (lambda: PhysicalBA(brightness=1.0), ValueError, "brightness must be in \\[0, 1\\)"),
    (lambda: PhysicalBA(flip_p=2), ValueError, "flip_p must be in \\[0, 1\\]"),
    (lambda: PhysicalBA(test_transforms="yes"), TypeError, "test_transforms must be True or False"),
])
def test_new_attacks_refuse_degenerate_parameters(make, exc, match):
    with pytest.raises(exc, match=match):
        make()
