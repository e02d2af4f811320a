"""ShrinkPad and DeepSweep: scores against direct per-image re-computations, seeding, input untouched."""

import numpy as np
import pytest
import scipy.ndimage
import torch
import torch.nn.functional as F
from torch import nn

from lightning_backdoor.detectors import DeepSweep, ShrinkPad, create_detector
from lightning_backdoor.detectors.functional import deep_sweep as D
from lightning_backdoor.detectors.functional.shrink_pad import shrink_pad


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def linear_net(c=1, size=12, k=5):
    """Predictions of a linear classifier on pixels move under small spatial changes."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(c * size * size, k)).train()


def images(n, c=1, size=12, seed=0):
    return torch.rand(n, c, size, size, generator=torch.Generator().manual_seed(seed))


# -- ShrinkPad --------------------------------------------------------------------------------------
def reference_shrink_pad_score(net, x, shrink, offsets):
    out = []
    with torch.no_grad():
        net.eval()
        for i in range(len(x)):
            h, w = x.shape[-2:]
            small = F.interpolate(x[i:i + 1], size=(h - shrink, w - shrink), mode="bilinear", align_corners=False,
                                  antialias=True)[0]
            base = int(net(x[i:i + 1]).argmax())
            changed = 0
            for top, left in offsets[i].tolist():
                canvas = torch.zeros_like(x[i])
                canvas[:, top:top + h - shrink, left:left + w - shrink] = small
                changed += int(net(canvas.clamp(0, 1)[None]).argmax()) != base
            out.append(changed / offsets.shape[1])
        net.train()
    return torch.tensor(out)


def test_shrink_pad_score_equals_direct_recomputation():
    net, x = linear_net(), images(9)
    x0 = x.clone()
    det = ShrinkPad(shrink=3, n=6, seed=2)
    ids = torch.arange(9) + 40
    offsets = det.offsets(9, ids)
    assert offsets.shape == (9, 6, 2) and int(offsets.min()) >= 0 and int(offsets.max()) <= 3
    scores = det.score(net, x, sample_ids=ids)
    torch.testing.assert_close(scores, reference_shrink_pad_score(net, x, 3, offsets))
    assert torch.equal(x, x0) and net.training
    assert len(set(scores.tolist())) > 1


def test_shrink_pad_places_the_shrunk_image_at_the_offset():
    x = torch.ones(2, 1, 6, 6)
    out = shrink_pad(x, 2, torch.tensor([[0, 0], [2, 1]]))
    assert out[0, 0, :4, :4].eq(1).all() and out[0, 0, 4:].eq(0).all() and out[0, 0, :, 4:].eq(0).all()
    assert out[1, 0, 2:, 1:5].eq(1).all() and out[1, 0, :2].eq(0).all() and out[1, 0, :, 0].eq(0).all()


def test_shrink_pad_seeded_and_batch_size_independent():
    net, x = linear_net(), images(10, seed=3)
    ids = torch.arange(10) * 7
    det = ShrinkPad(shrink=2, n=5)
    whole = det.score(net, x, sample_ids=ids)
    parts = torch.cat([det.score(net, x[:4], sample_ids=ids[:4]), det.score(net, x[4:], sample_ids=ids[4:])])
    assert torch.equal(whole, parts)
    assert torch.equal(whole, ShrinkPad(shrink=2, n=5, batch_size=3).score(net, x, sample_ids=ids))
    a, b = ShrinkPad(shrink=2, n=5, seed=1), ShrinkPad(shrink=2, n=5, seed=1)
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.score(net, x), b.score(net, x))
    assert not torch.equal(a.offsets(10), ShrinkPad(shrink=2, n=5, seed=2).offsets(10))


def test_shrink_larger_than_the_image_is_refused():
    with pytest.raises(ValueError, match="shrink=12 is not smaller than the image size 12x12"):
        ShrinkPad(shrink=12).score(linear_net(), images(2))
    with pytest.raises(ValueError, match="shrink must be >= 1"):
        ShrinkPad(shrink=0)


# -- DeepSweep --------------------------------------------------------------------------------------
def test_median_filter_matches_scipy():
    x = images(3, c=2, size=9, seed=4)
    ref = scipy.ndimage.median_filter(x.numpy(), size=(1, 1, 3, 3), mode="mirror")  # mirror = torch's reflect
    torch.testing.assert_close(D.median_filter(x), torch.from_numpy(ref))


def test_bit_depth_resample_and_affine_basics():
    x = images(2, c=3, size=8, seed=5)
    assert set((D.bit_depth(x) * 7).round().unique().tolist()) <= set(range(8))
    torch.testing.assert_close(D.bit_depth(x) * 7, (D.bit_depth(x) * 7).round())
    assert D.resample(x).shape == x.shape
    identity = torch.tensor([[0.0, 0.0, 0.0, 1.0]] * 2)
    torch.testing.assert_close(D.affine(x, identity), x, atol=1e-5, rtol=0)
    quarter = torch.tensor([[90.0, 0.0, 0.0, 1.0]] * 2)  # a quarter turn is a pixel permutation
    rotated = D.affine(x, quarter)
    assert any(torch.allclose(rotated, torch.rot90(x, k, dims=(2, 3)), atol=1e-5) for k in (1, 3))
    p = D.random_affine_params(1000, torch.Generator().manual_seed(0))
    assert p[:, 0].abs().max() <= 15 and p[:, 1:3].abs().max() <= 0.1 and 0.9 <= p[:, 3].min() <= p[:, 3].max() <= 1.1


def reference_deep_sweep(net, x, params):
    from torchvision.transforms.v2.functional import gaussian_blur

    out = []
    with torch.no_grad():
        net.eval()
        for i in range(len(x)):
            xi = x[i:i + 1]
            copies = [D.affine(xi, params[i:i + 1, v]) for v in range(params.shape[1])]
            copies.append(torch.from_numpy(scipy.ndimage.median_filter(xi.numpy(), size=(1, 1, 3, 3), mode="mirror")))
            copies.append(gaussian_blur(xi, [3, 3], [1.0, 1.0]))
            copies.append(torch.round(xi * 7) / 7)
            small = F.interpolate(xi, size=(6, 6), mode="bilinear", align_corners=False, antialias=True)
            copies.append(F.interpolate(small, size=(12, 12), mode="bilinear", align_corners=False).clamp(0, 1))
            base = int(net(xi).argmax())
            out.append(np.mean([int(net(c).argmax()) != base for c in copies]))
        net.train()
    return torch.tensor(out, dtype=torch.float32)


def test_deep_sweep_score_equals_direct_recomputation_and_input_unchanged():
    net, x = linear_net(), images(8, seed=6)
    x0 = x.clone()
    det = DeepSweep(n_affine=3, seed=1)
    ids = torch.arange(8)
    params = det.affine_params(8, ids)
    scores = det.score(net, x, sample_ids=ids)
    torch.testing.assert_close(scores, reference_deep_sweep(net, x, params))
    assert torch.equal(x, x0) and net.training and det.num_variants == 7
    assert len(set(scores.tolist())) > 1


def test_deep_sweep_seeded_and_batch_size_independent():
    net, x = linear_net(), images(9, seed=7)
    ids = torch.arange(9) + 1000
    det = DeepSweep(n_affine=2)
    whole = det.score(net, x, sample_ids=ids)
    parts = torch.cat([det.score(net, x[:5], sample_ids=ids[:5]), det.score(net, x[5:], sample_ids=ids[5:])])
    assert torch.equal(whole, parts)
    assert torch.equal(whole, DeepSweep(n_affine=2, batch_size=4).score(net, x, sample_ids=ids))
    only_fixed = DeepSweep(transforms=("median", "bit_depth"))
    assert only_fixed.affine_params(3) is None and only_fixed.num_variants == 2


@pytest.mark.parametrize("kwargs, match", [({"transforms": ["affine", "swirl"]}, "unknown DeepSweep transform 'swirl'"),
                                           ({"transforms": []}, "at least one"),
                                           ({"n_affine": 0}, "n_affine must be >= 1")])
def test_deep_sweep_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DeepSweep(**kwargs)


def test_registry():
    assert isinstance(create_detector("shrink_pad"), ShrinkPad) and isinstance(create_detector("deep_sweep"), DeepSweep)
