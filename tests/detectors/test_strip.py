import math

import pytest
import torch
from torch import nn
from torch.distributions import Categorical

from lightning_backdoor.detectors import Strip, create_detector, threshold_at_fpr
from lightning_backdoor.utils import random_subset
from lightning_backdoor.detectors.functional import (
    entropy_over_classes,
    strip_entropy,
    strip_overlay_indices,
    superimpose,
)


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class Center(nn.Module):
    def forward(self, x):
        return x - 0.5


def tiny_net(k: int = 4, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    net = nn.Sequential(
        Center(), nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.3),
        nn.Flatten(), nn.Linear(4 * 6 * 6, k),
    ).double()
    with torch.no_grad():
        net[2].running_mean.uniform_(-0.2, 0.2)
        net[2].running_var.uniform_(0.5, 2.0)
    return net.eval()


def images(n: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 6, 6, generator=g, dtype=torch.float64) * 0.7


def reference_strip(net, x, pool, idx, mode):
    """Per image, per overlay: blend, softmax, entropy over classes via Categorical."""
    out = []
    with torch.no_grad():
        for i, xi in enumerate(x):
            hs = []
            for j in idx[i]:
                if mode == "add":
                    blended = torch.clamp(xi + pool[j], 0.0, 1.0)
                else:
                    blended = 0.5 * xi + 0.5 * pool[j]
                hs.append(float(Categorical(logits=net(blended[None])[0]).entropy()))
            out.append(-sum(hs) / len(hs))
    return torch.tensor(out, dtype=torch.float32)


@pytest.mark.parametrize("mode", ["add", "average"])
@pytest.mark.parametrize("batch_size", [1, 5, 512])
def test_strip_entropy_matches_reference(mode, batch_size):
    net, x, pool = tiny_net(), images(6), images(10, seed=2)
    x0, pool0 = x.clone(), pool.clone()
    scores = strip_entropy(net, x, pool, n=7, generator=torch.Generator().manual_seed(3), mode=mode, batch_size=batch_size)
    idx = strip_overlay_indices(6, 10, 7, torch.Generator().manual_seed(3))
    torch.testing.assert_close(scores, reference_strip(net, x, pool, idx, mode), rtol=1e-5, atol=1e-6)
    assert torch.equal(x, x0) and torch.equal(pool, pool0)  # never in place


def test_add_mode_clips_and_differs_from_average():
    a = torch.full((1, 3, 2, 2), 0.8)
    b = torch.full((1, 3, 2, 2), 0.7)
    assert torch.equal(superimpose(a, b, "add"), torch.ones(1, 3, 2, 2))
    torch.testing.assert_close(superimpose(a, b, "average"), torch.full((1, 3, 2, 2), 0.75))
    assert a.max() == 0.8 and b.max() == 0.7
    net, x, pool = tiny_net(), images(4), images(10, seed=2)
    s_add = strip_entropy(net, x, pool, 5, torch.Generator().manual_seed(0), "add")
    s_avg = strip_entropy(net, x, pool, 5, torch.Generator().manual_seed(0), "average")
    assert not torch.allclose(s_add, s_avg)


def test_entropy_is_over_the_class_axis():
    logits = torch.randn(7, 3, dtype=torch.float64)  # N != K so a wrong axis would change the shape
    torch.testing.assert_close(entropy_over_classes(logits), Categorical(logits=logits).entropy().float())
    # confident predictions: entropy ~ 0, not NaN
    sharp = torch.tensor([[1000.0, 0.0, -1000.0]])
    assert entropy_over_classes(sharp).item() == pytest.approx(0.0, abs=1e-6)
    assert entropy_over_classes(torch.zeros(2, 4)).tolist() == pytest.approx([math.log(4)] * 2)


def test_overlay_indices_distinct_and_with_replacement():
    idx = strip_overlay_indices(5, 20, 8, torch.Generator().manual_seed(0))
    assert idx.shape == (5, 8) and all(len(set(r.tolist())) == 8 for r in idx)
    idx = strip_overlay_indices(5, 3, 8, torch.Generator().manual_seed(0))
    assert idx.shape == (5, 8) and idx.max() < 3


def test_fit_pool_and_threshold_from_benign():
    net = tiny_net()
    xb, yb = images(30, seed=4), torch.arange(30) % 4
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(xb, yb), batch_size=8)
    det = Strip(n=6, pool_size=12, seed=5, target_fpr=0.1).fit(net, loader)
    # the pool is a seeded random sample of the fit images, not the first ones
    pool_pos = random_subset(30, 12, seed=5)
    assert pool_pos.tolist() != list(range(12))
    assert det.pool.shape == (12, 3, 6, 6) and torch.equal(det.pool, xb[pool_pos])
    # threshold = the 90% quantile of the benign scores over ALL fit images, each pool image never
    # blended with itself, same random draws
    exclude = torch.full((30,), -1, dtype=torch.long)
    exclude[pool_pos] = torch.arange(12)
    g = torch.Generator().manual_seed(5)
    ref = strip_entropy(net, xb, xb[pool_pos], 6, g, exclude=exclude)
    assert det.threshold == pytest.approx(threshold_at_fpr(ref, 0.1))
    assert (ref > det.threshold).float().mean() <= 0.1
    assert (ref > det.threshold).sum() == 3  # exactly floor(0.1 * 30) benign scores above


@pytest.mark.parametrize("pool_size,n", [(10, 4), (10, 9), (5, 8), (2, 3)])
def test_overlay_indices_never_pick_the_excluded_image(pool_size, n):
    g = torch.Generator().manual_seed(0)
    exclude = torch.tensor([i % pool_size for i in range(40)] + [-1] * 10)
    idx = strip_overlay_indices(50, pool_size, n, g, exclude=exclude)
    assert idx.shape == (50, n) and int(idx.min()) >= 0 and int(idx.max()) < pool_size
    for row, ex in zip(idx.tolist(), exclude.tolist()):
        if ex >= 0:
            assert ex not in row
        if pool_size - (ex >= 0) >= n:
            assert len(set(row)) == n  # distinct when there are enough others


def test_calibration_images_are_not_blended_with_themselves():
    """A pool of near-duplicates of each calibration image would give it a low entropy with itself."""
    net = tiny_net()
    x, y = images(8, seed=1), torch.arange(8) % 4
    det = Strip(n=7, pool_size=8, seed=0).fit(net, (x, y))
    assert torch.equal(det.pool, x)  # pool_size >= the fit set: all of it, in order
    g = torch.Generator().manual_seed(0)
    ref = strip_entropy(net, x, x, 7, g, exclude=torch.arange(8))  # image i blended with the 7 others
    assert det.threshold == pytest.approx(threshold_at_fpr(ref, 0.05))
    g = torch.Generator().manual_seed(0)
    with_self = strip_entropy(net, x, x, 7, g)
    assert det.threshold != pytest.approx(threshold_at_fpr(with_self, 0.05))


def test_threshold_argument_honoured():
    net = tiny_net()
    det = Strip(n=4, threshold=-1.0).fit(net, (images(10), torch.zeros(10, dtype=torch.long)))
    assert det.threshold == -1.0
    x = images(6, seed=9)
    state = det.generator.get_state()
    scores = det.score(net, x)
    det.generator.set_state(state)
    assert torch.equal(det.predict(net, x), scores > -1.0)


def test_threshold_at_fpr():
    s = torch.arange(100.0)
    assert threshold_at_fpr(s, 0.05) == 94.0 and (s > 94.0).sum() == 5
    assert threshold_at_fpr(s, 0.01) == 98.0
    assert threshold_at_fpr(torch.ones(10), 0.05) == 1.0
    with pytest.raises(ValueError, match="empty"):
        threshold_at_fpr(torch.zeros(0), 0.05)


def test_seeded_generator_and_global_rng():
    net, xb = tiny_net(), images(10)
    data = (xb, torch.zeros(10, dtype=torch.long))
    rng = torch.get_rng_state()
    a = Strip(n=5, seed=1).fit(net, data)
    b = Strip(n=5, seed=1).fit(net, data)
    x = images(4, seed=8)
    sa = a.score(net, x)
    assert torch.equal(sa, b.score(net, x))
    assert not torch.equal(sa, a.score(net, x))  # the detector's own stream advances
    assert torch.equal(torch.get_rng_state(), rng)


def test_scoring_leaves_model_untouched_and_any_batch():
    net = tiny_net().train()
    params = {k: v.clone() for k, v in net.state_dict().items()}
    det = Strip(n=4).fit(net, (images(10), torch.zeros(10, dtype=torch.long)))
    assert det.score(net, images(1)).shape == (1,)
    assert det.score(net, images(1)[0]).shape == (1,)
    assert det.score(net, images(9)).shape == (9,)
    assert det.score(net, images(1)[:0]).shape == (0,)
    assert all(m.training for m in net.modules())
    for k, v in net.state_dict().items():
        assert torch.equal(v, params[k]), k


def test_state_dict_roundtrip(tmp_path):
    net = tiny_net()
    det = Strip(n=5).fit(net, (images(10), torch.zeros(10, dtype=torch.long)))
    torch.save(det.state_dict(), tmp_path / "s.pt")
    other = Strip(n=5)
    other.load_state_dict(torch.load(tmp_path / "s.pt", weights_only=True))
    assert other.fitted and other.threshold == det.threshold
    x = images(3, seed=6)
    assert torch.equal(other.score(net, x), det.score(net, x))


def test_registry_and_hparams():
    det = create_detector("strip", n=20)
    assert isinstance(det, Strip) and det.requires_fit
    assert det.hparams() == {
        "n": 20, "mode": "add", "threshold": None, "pool_size": 1000, "target_fpr": 0.05, "batch_size": 512, "seed": 0,
    }


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        ({"n": 0}, ValueError, "n must be"),
        ({"n": 2.5}, TypeError, "n must be"),
        ({"mode": "blend"}, ValueError, "mode must be one of"),
        ({"pool_size": 0}, ValueError, "pool_size"),
        ({"target_fpr": -0.1}, ValueError, "target_fpr"),
        ({"threshold": "x"}, TypeError, "threshold"),
        ({"seed": 1.0}, TypeError, "seed"),
    ],
)
def test_argument_errors(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        Strip(**kwargs)


def test_input_errors():
    net = tiny_net()
    with pytest.raises(RuntimeError, match="must be fitted"):
        Strip().score(net, images(2))
    det = Strip(n=2).fit(net, (images(4), torch.zeros(4, dtype=torch.long)))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        det.score(net, images(2) - 0.5)
    with pytest.raises(TypeError, match="uint8"):
        det.score(net, (images(2) * 255).to(torch.uint8))
    with pytest.raises(ValueError, match="clean_pool"):
        det.score(net, torch.rand(2, 3, 7, 7, dtype=torch.float64))
    one_shot = iter([(images(4), torch.zeros(4, dtype=torch.long))])
    assert Strip(n=2).fit(net, one_shot).pool.shape == (4, 3, 6, 6)  # benign data is read once
