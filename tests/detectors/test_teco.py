"""TeCo: the torch corruptions against the imagecorruptions library, the score against a direct re-computation."""

import numpy as np
import pytest
import torch
from torch import nn

from lightning_backdoor.detectors import TeCo, create_detector
from lightning_backdoor.detectors.functional import teco as T

pytest.importorskip("imagecorruptions")


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def images(shape, seed=0):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed))


def tiny_net(channels=1, size=28, k=4):
    """A linear classifier on the pixels: its predictions react to corruptions at various severities."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(channels * size * size, k)).eval()


SHAPES = [(3, 3, 32, 32), (3, 1, 28, 28)]


@pytest.mark.parametrize("shape", SHAPES, ids=["rgb32", "gray28"])
@pytest.mark.parametrize("name", ["contrast", "brightness", "defocus_blur", "zoom_blur"])
def test_deterministic_torch_corruptions_match_the_library(shape, name):
    x = images(shape)
    for severity in (1, 2, 3, 4, 5):
        ref = T.reference_corrupt(x, name, severity, [0] * len(x))
        got = T.torch_corrupt(x, name, severity, [0] * len(x), library_on_cpu=False)
        diff = (ref - got).abs()
        # the same 8-bit values, but for float round-off at a truncation boundary (one level, rarely)
        assert float(diff.max()) <= 1 / 255 + 1e-6, (name, severity)
        assert float((diff > 1e-6).float().mean()) <= 1e-3, (name, severity)


@pytest.mark.parametrize("shape", SHAPES, ids=["rgb32", "gray28"])
def test_frost_matches_the_library_for_the_same_frost_crop(shape):
    x = images(shape, seed=1)
    seeds = [11, 12, 13]
    for severity in (1, 3, 5):
        ref = T.reference_corrupt(x, "frost", severity, seeds)
        crops = []
        for s in seeds:  # replay the library's draws: frost image, then the crop position
            np.random.seed(s)
            idx = np.random.randint(6)
            fr = T._frost_rescaled(idx, shape[2], shape[3])
            crops.append((idx, np.random.randint(0, fr.shape[1] - shape[2]), np.random.randint(0, fr.shape[2] - shape[3])))
        got = T.frost_with(T._quantise(x.double()), severity, torch.tensor(crops)).float()
        assert torch.equal(ref, got), severity


@pytest.mark.parametrize("shape", SHAPES, ids=["rgb32", "gray28"])
def test_glass_blur_matches_the_library_for_the_same_pixel_offsets(shape):
    x = images(shape, seed=4)
    seeds = [5, 6, 7]
    for severity in (1, 3, 5):
        ref = T.reference_corrupt(x, "glass_blur", severity, seeds)
        _, delta, _ = T._GLASS[severity - 1]
        steps = len(T.glass_positions(shape[2], shape[3], severity))
        offsets = []
        for s in seeds:  # the library seeds numba's Mersenne Twister, which draws as numpy's legacy one
            rs = np.random.RandomState(s)
            offsets.append([rs.randint(-delta, delta, size=(2,)).tolist() for _ in range(steps)])
        got = T.glass_with(T._quantise(x.double()), severity, torch.tensor(offsets)).float()
        assert torch.equal(ref, got), severity


@pytest.mark.parametrize("name", ["gaussian_noise", "shot_noise", "impulse_noise"])
def test_noise_corruptions_match_the_library_in_distribution(name):
    x = torch.full((40, 1, 28, 28), 0.4)
    ids = list(range(40))
    for severity in (1, 5):
        ref, got = T.reference_corrupt(x, name, severity, ids), T.torch_corrupt(x, name, severity, ids)
        for stat in (lambda t: t.mean(), lambda t: t.std(), lambda t: (t == 0).float().mean(),
                     lambda t: (t == 1).float().mean()):
            assert float(stat(got)) == pytest.approx(float(stat(ref)), abs=0.01), (name, severity)


def test_library_path_restores_numpy_global_rng_and_never_modifies_input():
    x = images((2, 3, 32, 32))
    x0 = x.clone()
    np.random.seed(123)
    expected = np.random.rand()
    np.random.seed(123)
    for name in T.TECO_CORRUPTIONS:
        T.reference_corrupt(x, name, 2, [1, 2])
    assert np.random.rand() == expected
    assert torch.equal(x, x0)


def reference_teco(net, x, seeds, corruptions, severities):
    """Direct re-computation: each input, each corruption and severity on its own, numpy std."""
    out = []
    with torch.no_grad():
        for i in range(len(x)):
            xi = x[i:i + 1]
            base = int(net(xi).argmax())
            flips = []
            for c in corruptions:
                flip = 6
                for s in severities:
                    copy = T.torch_corrupt(xi, c, s, [T.corruption_seed(seeds[i], c, s)])  # as the detector does
                    if int(net(copy).argmax()) != base:
                        flip = s
                        break
                flips.append(flip)
            out.append(np.std(flips))
    return torch.tensor(out, dtype=torch.float32)


CORR = ("gaussian_noise", "contrast", "brightness", "defocus_blur", "pixelate")


def test_score_equals_direct_recomputation_and_input_unchanged():
    net, x = tiny_net(), images((6, 1, 28, 28), seed=2)
    x0 = x.clone()
    det = TeCo(corruptions=CORR, severities=(1, 3, 5))
    ids = torch.arange(6) + 100
    scores, flips = det.score(net, x, sample_ids=ids, return_flips=True)
    ref = reference_teco(net, x, det.base_seeds(6, ids), CORR, (1, 3, 5))
    torch.testing.assert_close(scores, ref)
    assert torch.equal(x, x0)
    assert flips.shape == (len(CORR), 6) and set(flips.unique().tolist()) <= {1.0, 3.0, 5.0, 6.0}
    assert len(set(scores.tolist())) > 1  # not all-equal on this data


def test_first_flip_and_deviation():
    pred = torch.tensor([0, 1])
    # types x severities x inputs
    labels = torch.tensor([[[0, 1], [2, 1], [2, 2]],
                           [[0, 1], [0, 1], [0, 1]]])
    flips = T.first_flip_severity(pred, labels, (1, 2, 3))
    assert flips.tolist() == [[2.0, 3.0], [6.0, 6.0]]
    torch.testing.assert_close(T.teco_deviation(flips), torch.tensor([np.std([2, 6]), np.std([3, 6])]).float())


def test_seeded_and_batch_size_independent():
    net, x = tiny_net(), images((7, 1, 28, 28), seed=3)
    ids = torch.arange(7) * 3
    det = TeCo(corruptions=("gaussian_noise", "shot_noise", "impulse_noise", "glass_blur"), severities=(2, 4), seed=5)
    whole = det.score(net, x, sample_ids=ids)
    parts = torch.cat([det.score(net, x[:3], sample_ids=ids[:3]), det.score(net, x[3:], sample_ids=ids[3:])])
    assert torch.equal(whole, parts)
    assert torch.equal(whole, TeCo(corruptions=det.corruptions, severities=(2, 4), seed=5, batch_size=2).score(
        net, x, sample_ids=ids))
    # without ids: the detector's own generator, reproducible through state_dict
    a = TeCo(corruptions=det.corruptions, severities=(2, 4), seed=5)
    b = TeCo(corruptions=det.corruptions, severities=(2, 4), seed=5)
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.score(net, x), b.score(net, x))


def test_rgb_and_reference_backend_run():
    net = tiny_net(channels=3, size=32)
    x = images((2, 3, 32, 32))
    s = TeCo(corruptions=("fog", "elastic_transform", "jpeg_compression", "motion_blur"), severities=(1, 5),
             backend="reference").score(net, x, sample_ids=torch.tensor([0, 1]))
    assert s.shape == (2,) and torch.isfinite(s).all()


@pytest.mark.parametrize("kwargs, exc, match", [
    ({"corruptions": ["gaussian_noise", "fisheye"]}, ValueError, "unknown corruption 'fisheye'"),
    ({"corruptions": "contrast"}, TypeError, "sequence of names"),
    ({"severities": [0, 1]}, ValueError, "severities must be in 1...5"),
    ({"severities": [3, 6]}, ValueError, "severities must be in 1...5"),
    ({"severities": [3, 1]}, ValueError, "strictly increasing"),
    ({"backend": "numpy"}, ValueError, "backend must be one of"),
])
def test_bad_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        TeCo(**kwargs)


def test_registry():
    assert isinstance(create_detector("teco"), TeCo)
