import math
import warnings

import pytest
import torch
from torch import nn

from lightning_backdoor.detectors import ScaleUp, create_detector, functional as F
from lightning_backdoor.detectors.functional import scale_up_class_stats, scale_up_nspc, scale_up_spc

SCALES = (1.1, 1.3, 1.6, 2.0, 3.0)  # small factors so that SPC takes many values on a random net


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny forwards are dominated by thread overhead on a shared CPU."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class Center(nn.Module):
    def forward(self, x):
        return x - 0.5


def tiny_net(k: int = 5, seed: int = 0) -> nn.Module:
    """float64 (no argmax near-ties between batched and per-image forwards), with BN and dropout."""
    torch.manual_seed(seed)
    net = nn.Sequential(
        Center(), nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.3),
        nn.Flatten(), nn.Linear(4 * 8 * 8, k),
    ).double()
    with torch.no_grad():  # non-trivial BN statistics so eval/train mode matters
        net[2].running_mean.uniform_(-0.2, 0.2)
        net[2].running_var.uniform_(0.5, 2.0)
    return net.eval()


def images(n: int, seed: int = 1) -> torch.Tensor:
    """Random images of varied brightness, so that SPC takes many values."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, 8, 8, generator=g, dtype=torch.float64)
    return x * torch.rand(n, 1, 1, 1, generator=g, dtype=torch.float64)


def reference_spc(net, x, scales):
    """One image at a time, straight from the formula."""
    out, preds = [], []
    with torch.no_grad():
        for xi in x:
            base = int(net(xi[None]).argmax(1))
            same = [int(net((s * xi).clamp(0, 1)[None]).argmax(1)) == base for s in scales]
            out.append(sum(same) / len(scales))
            preds.append(base)
    return torch.tensor(out, dtype=torch.float32), torch.tensor(preds)


@pytest.mark.parametrize("batch_size", [None, 1, 4, 7, 512])
def test_spc_matches_reference(batch_size):
    net, x = tiny_net(), images(23)
    spc, pred = scale_up_spc(net, x, SCALES, batch_size=batch_size, return_pred=True)
    ref, ref_pred = reference_spc(net, x, SCALES)
    assert spc.dtype == torch.float32 and spc.shape == (23,)
    torch.testing.assert_close(spc, ref)
    assert torch.equal(pred, ref_pred)
    assert len(spc.unique()) > 2  # the test data exercises more than all-or-nothing


def test_spc_default_scales_and_input_untouched():
    net, x = tiny_net(), images(6)
    x0 = x.clone()
    spc = scale_up_spc(net, x)
    torch.testing.assert_close(spc, reference_spc(net, x, (3, 5, 7, 9, 11))[0])
    assert torch.equal(x, x0)


def test_spc_costs_one_forward_per_block():
    net, x = tiny_net(), images(10)
    calls = []
    net.register_forward_hook(lambda m, i, o: calls.append(len(i[0])))
    scale_up_spc(net, x, SCALES, batch_size=512)
    assert calls == [60]
    calls.clear()
    scale_up_spc(net, x, SCALES, batch_size=24)  # 4 inputs x 6 copies per forward
    assert calls == [24, 24, 12]
    calls.clear()
    scale_up_spc(net, x, SCALES)  # default: 1 + |S| forwards, each the size of the scored batch
    assert calls == [10] * (1 + len(SCALES))


def benign(n=60, seed=2, k=5):
    x = images(n, seed)
    return x, torch.arange(n) % k


@pytest.mark.parametrize("group_by", ["true_label", "predicted"])
def test_nspc_per_class_zscore_matches_manual(group_by):
    net = tiny_net()
    xb, yb = benign()
    det = ScaleUp(scales=SCALES, mode="data_limited", threshold=0.0, group_by=group_by)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        det.fit(net, torch.utils.data.DataLoader(torch.utils.data.TensorDataset(xb, yb), batch_size=16))
    spc_b, pred_b = reference_spc(net, xb, SCALES)
    groups = yb if group_by == "true_label" else pred_b  # the paper's X_i: benign samples of TRUE class i
    assert int(det.counts.sum()) == len(xb)  # every batch was used, not just the first
    gmean, gstd = spc_b.mean(), spc_b.std(correction=0)
    own = [c for c in range(det.num_classes) if (groups == c).sum() > 1 and spc_b[groups == c].std() > 0]
    assert len(own) >= 2  # the data exercises real per-class statistics
    for c in range(det.num_classes):
        vals = spc_b[groups == c]
        if len(vals) == 0:
            assert det.mean_per_class[c] == pytest.approx(float(gmean), abs=1e-6)
            assert det.std_per_class[c] == pytest.approx(float(gstd), abs=1e-6)
        elif vals.std(correction=0) > 0:
            assert det.mean_per_class[c] == pytest.approx(float(vals.mean()), abs=1e-6)
            assert det.std_per_class[c] == pytest.approx(float(vals.std(correction=0)), abs=1e-6)
        else:  # all equal: own mean, global spread
            assert c in det.zero_std_classes
            assert det.mean_per_class[c] == pytest.approx(float(vals.mean()), abs=1e-6)
            assert det.std_per_class[c] == pytest.approx(float(gstd), abs=1e-6)
    x = images(17, seed=5)
    spc, pred = reference_spc(net, x, SCALES)  # the test input is normalised by its PREDICTED class
    manual = torch.tensor(
        [(float(s) - float(det.mean_per_class[p])) / float(det.std_per_class[p]) for s, p in zip(spc, pred)]
    )
    torch.testing.assert_close(det.score(net, x), manual.float())
    torch.testing.assert_close(scale_up_nspc(spc, pred, det.mean_per_class, det.std_per_class), manual.float())


def test_true_label_and_predicted_grouping_differ_when_the_model_errs():
    net = ConstantClassNet()  # predicts 0 or 1 only: true-class groups differ from predicted ones
    x = torch.cat([torch.rand(12, 3, 4, 4) * 0.3, torch.rand(12, 3, 4, 4) * 0.3 + 0.6])
    y = torch.tensor([0, 1, 2] * 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a = ScaleUp(scales=(1.5, 2.0, 3.0), mode="data_limited").fit(net, (x, y))
        b = ScaleUp(scales=(1.5, 2.0, 3.0), mode="data_limited", group_by="predicted").fit(net, (x, y))
    assert a.counts.tolist() == [8, 8, 8] and b.counts.tolist()[2] == 0


def test_few_fitting_samples_per_class_warn():
    net, (xb, yb) = tiny_net(), benign(20, k=4)  # 5 per class < 10
    with pytest.warns(UserWarning, match=r"fewer than 10 benign fitting samples \(\[5, 5, 5, 5\]\)"):
        ScaleUp(scales=SCALES, mode="data_limited").fit(net, (xb, yb))


def test_class_stats_and_global_mode():
    spc = torch.tensor([0.2, 0.4, 1.0, 0.0, 0.6])
    pred = torch.tensor([0, 0, 2, 2, 2])
    mean, std, counts = scale_up_class_stats(spc, pred, 4)
    assert counts.tolist() == [2, 0, 3, 0]
    assert mean[0] == pytest.approx(0.3) and std[0] == pytest.approx(0.1)
    assert mean[2] == pytest.approx(1.6 / 3)
    assert math.isnan(float(mean[1])) and math.isnan(float(std[3]))
    net, (xb, yb) = tiny_net(), benign()
    det = ScaleUp(scales=SCALES, mode="data_limited_global").fit(net, (xb, yb))
    spc_b, _ = reference_spc(net, xb, SCALES)
    x = images(9, seed=7)
    ref = (reference_spc(net, x, SCALES)[0] - spc_b.mean()) / spc_b.std(correction=0)
    torch.testing.assert_close(det.score(net, x), ref, rtol=1e-5, atol=1e-5)


def test_nspc_rejects_zero_std_and_bad_labels():
    with pytest.raises(ValueError, match="std_per_class"):
        scale_up_nspc(torch.tensor([0.5]), torch.tensor([0]), torch.tensor([0.5]), torch.tensor([0.0]))
    with pytest.raises(ValueError, match="pred"):
        scale_up_nspc(torch.tensor([0.5]), torch.tensor([3]), torch.tensor([0.5]), torch.tensor([1.0]))


class ConstantClassNet(nn.Module):
    """Predicts class 0 for dark and class 1 for bright images; class 2 is never predicted."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.tensor(1.0))

    def forward(self, x):
        m = x.mean(dim=(1, 2, 3)) * self.w
        return torch.stack([0.5 - m, m - 0.5, torch.full_like(m, -10.0)], dim=1)


def test_fit_with_missing_class_warns_and_falls_back():
    net = ConstantClassNet()
    x = torch.cat([torch.full((4, 3, 4, 4), 0.1), torch.rand(6, 3, 4, 4) * 0.2 + 0.3, torch.full((2, 3, 4, 4), 0.9)])
    y = torch.tensor([0, 1, 3] * 4)  # true class 2 has no fitting sample
    det = ScaleUp(scales=(1.5, 2.0, 3.0), mode="data_limited")
    with pytest.warns(UserWarning, match=r"classes \[2\] have no benign fitting samples"):
        det.fit(net, (x, y))
    assert det.num_classes == 4
    assert det.mean_per_class[2] == pytest.approx(det.global_mean)
    assert det.std_per_class[2] == pytest.approx(det.global_std)
    assert torch.isfinite(det.score(net, x)).all()


def test_all_equal_benign_spc_never_divides_by_zero():
    net = ConstantClassNet()
    x = torch.full((12, 3, 4, 4), 0.9)
    with pytest.warns(UserWarning, match="using std 1"):
        det = ScaleUp(mode="data_limited").fit(net, (x, torch.zeros(12, dtype=torch.long)))
    assert torch.isfinite(det.score(net, torch.rand(5, 3, 4, 4))).all()


def test_zero_std_class_is_not_a_warning():
    """SPC takes |S| + 1 values: a class with one benign SPC value is normal and needs no warning."""
    net = ConstantClassNet()
    x = torch.cat([torch.full((10, 3, 4, 4), 0.1), torch.rand(10, 3, 4, 4) * 0.2 + 0.3])
    y = torch.tensor([0] * 10 + [1] * 10)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        det = ScaleUp(scales=(1.5, 2.0, 3.0), mode="data_limited").fit(net, (x, y))
    assert 0 in det.zero_std_classes and det.std_per_class[0] == pytest.approx(det.global_std)


def test_thresholds():
    net, x = tiny_net(), images(20)
    det = ScaleUp(scales=SCALES)
    assert det.threshold == 0.5 and not det.requires_fit
    assert torch.equal(det.predict(net, x), det.score(net, x) > 0.5)
    det = ScaleUp(scales=SCALES, threshold=0.75)
    assert torch.equal(det.predict(net, x), det.score(net, x) > 0.75)
    xb, yb = benign(80)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        det = ScaleUp(scales=SCALES, mode="data_limited", target_fpr=0.1).fit(net, (xb, yb))
        assert math.isfinite(det.threshold)
        assert det.predict(net, xb).float().mean() <= 0.1
        det2 = ScaleUp(scales=SCALES, mode="data_limited", threshold=1.5).fit(net, (xb, yb))
    assert det2.threshold == 1.5
    assert torch.equal(det2.predict(net, x), det2.score(net, x) > 1.5)


def test_scoring_leaves_model_and_rng_untouched():
    net = tiny_net().train()
    net[2].eval()  # mixed modes must survive too
    params = {k: v.clone() for k, v in net.state_dict().items()}
    modes = [m.training for m in net.modules()]
    rng = torch.get_rng_state()
    xb, yb = benign()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for mode in ("data_free", "data_limited", "data_limited_global"):
            det = ScaleUp(scales=SCALES, mode=mode).fit(net, (xb, yb))
            s1 = det.score(net, images(5))
            s2 = det.score(net, images(5))
            assert torch.equal(s1, s2)  # eval mode: dropout off
    assert [m.training for m in net.modules()] == modes
    for k, v in net.state_dict().items():
        assert torch.equal(v, params[k]), k
    assert torch.equal(torch.get_rng_state(), rng)


def test_any_batch_size_and_single_image():
    net = tiny_net()
    det = ScaleUp(scales=SCALES)
    x = images(3)
    full = det.score(net, x)
    assert det.score(net, x[:1]).shape == (1,)
    torch.testing.assert_close(det.score(net, x[0]), full[:1])
    assert ScaleUp(scales=SCALES, batch_size=1).score(net, x).tolist() == full.tolist()
    assert det.score(net, x[:0]).shape == (0,)


def test_state_dict_roundtrip(tmp_path):
    net, (xb, yb) = tiny_net(), benign()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        det = ScaleUp(scales=SCALES, mode="data_limited").fit(net, (xb, yb))
    path = tmp_path / "det.pt"
    torch.save(det.state_dict(), path)
    other = ScaleUp(scales=SCALES, mode="data_limited")
    other.load_state_dict(torch.load(path, weights_only=True))
    assert other.fitted and other.threshold == det.threshold
    x = images(7)
    assert torch.equal(other.score(net, x), det.score(net, x))
    with pytest.raises(ValueError, match="mode"):
        ScaleUp(scales=SCALES, mode="data_limited_global").load_state_dict(det.state_dict())


def test_registry_and_hparams():
    det = create_detector("scale_up", mode="data_limited", scales=[2, 4])
    assert isinstance(det, ScaleUp) and det.scales == (2.0, 4.0)
    hp = det.hparams()
    assert hp == {"scales": [2.0, 4.0], "mode": "data_limited", "threshold": None, "batch_size": None, "target_fpr": 0.05,
                  "group_by": "true_label"}
    assert F.scale_up_spc is scale_up_spc


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        ({"scales": ()}, ValueError, "non-empty"),
        ({"scales": (3, 0)}, ValueError, "> 1"),
        ({"scales": (3, -1.5)}, ValueError, "> 1"),
        ({"scales": (3, 1.0)}, ValueError, "n = 1 is the identity"),
        ({"scales": (3, "5")}, TypeError, "real numbers"),
        ({"scales": 3}, TypeError, "sequence"),
        ({"scales": (3, float("nan"))}, ValueError, "finite"),
        ({"mode": "data-free"}, ValueError, "mode must be one of"),
        ({"batch_size": 0}, ValueError, "batch_size"),
        ({"threshold": "high"}, TypeError, "threshold"),
        ({"target_fpr": 1.5}, ValueError, "target_fpr"),
    ],
)
def test_argument_errors(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        ScaleUp(**kwargs)


def test_input_errors():
    net = tiny_net()
    with pytest.raises(RuntimeError, match="must be fitted"):
        ScaleUp(mode="data_limited").score(net, images(2))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        ScaleUp().score(net, images(2) * 2)
    with pytest.raises(TypeError, match="uint8"):
        ScaleUp().score(net, (images(2) * 255).to(torch.uint8))
    with pytest.raises(TypeError, match="labels are needed"):
        ScaleUp(mode="data_limited").fit(net, images(2))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_follows_model_device():
    net = tiny_net().cuda()
    scores = ScaleUp(scales=SCALES).score(net, images(4))  # CPU input moves to the model
    assert scores.device.type == "cuda"
