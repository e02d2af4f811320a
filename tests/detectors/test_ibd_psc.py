import copy
import gc
import pickle
import warnings
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lightning_backdoor.detectors.functional.shared_prefix as shared_prefix
from lightning_backdoor.detectors import IBDPSC, create_detector
from lightning_backdoor.detectors.functional import (
    amplification_runner,
    amplified_forward,
    amplified_layer_counts,
    bn_layers,
    ibd_psc_score,
    run_amplified,
    select_k,
)
from lightning_backdoor.utils import random_subset


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class Block(nn.Module):
    """Residual block; the shortcut (with its BN) is registered first but runs last."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.shortcut = (
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
            if stride != 1 or cin != cout
            else nn.Identity()
        )
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class TinyResNet(nn.Module):
    FORWARD_ORDER = ["bn", "block1.bn1", "block1.bn2", "block2.bn1", "block2.bn2", "block2.shortcut.1"]

    def __init__(self, num_classes: int = 4, width: int = 4) -> None:
        super().__init__()
        self.fc = nn.Linear(2 * width, num_classes)
        self.conv = nn.Conv2d(3, width, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(width)
        self.block1 = Block(width, width, 1)
        self.block2 = Block(width, 2 * width, 2)

    def forward(self, x):
        x = F.relu(self.bn(self.conv(x - 0.5)))
        x = self.block2(self.block1(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class Untraceable(TinyResNet):
    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace this
            x = x * 1.0
        return super().forward(x)


def randomize(net: nn.Module, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
                m.running_mean.uniform_(-0.3, 0.3)
                m.running_var.uniform_(0.5, 2.0)
    return net


def calibrate(net: nn.Module, x: torch.Tensor) -> nn.Module:
    """Running statistics = the statistics of ``x``, so predictions vary across inputs."""
    bns = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    net.train()
    with torch.no_grad():
        net(x)
    for m in bns:
        m.momentum = 0.1
    return net.eval()


def tiny(seed: int = 1, cls=TinyResNet, calibrated: bool = True) -> nn.Module:
    """float64 TinyResNet with random γ, β and (by default) running stats fitted to ``images``."""
    torch.manual_seed(seed)
    net = randomize(cls().double(), seed)
    return calibrate(net, images(64, seed=9)) if calibrated else net.eval()


def images(n: int, seed: int = 1, size: int = 8) -> torch.Tensor:
    """Noisy solid-colour images: different enough for a random tiny net to predict several classes."""
    g = torch.Generator().manual_seed(seed)
    colour = torch.rand(n, 3, 1, 1, generator=g, dtype=torch.float64)
    return (colour + 0.2 * torch.rand(n, 3, size, size, generator=g, dtype=torch.float64)).clamp(0, 1)


def reference_psc(net, x, counts, omega, order):
    """Independent reference: deep copies with γ, β multiplied in place, softmax, average."""
    ref = copy.deepcopy(net).eval()
    with torch.no_grad():
        pred = ref(x).argmax(1)
        probs = []
        for i in counts:
            amp = copy.deepcopy(ref)
            for name in order[len(order) - i :]:
                bn = amp.get_submodule(name)
                bn.weight.mul_(omega)
                bn.bias.mul_(omega)
            probs.append(amp(x).softmax(1)[torch.arange(len(x)), pred])
    return torch.stack(probs).mean(0)


def reference_etas(net, x, y, omega, order):
    etas = []
    for k in range(1, len(order) + 1):
        amp = copy.deepcopy(net).eval()
        with torch.no_grad():
            for name in order[len(order) - k :]:
                amp.get_submodule(name).weight.mul_(omega)
                amp.get_submodule(name).bias.mul_(omega)
            etas.append(float((amp(x).argmax(1) != y).double().mean()))
    return etas


def snapshot(net):
    return {k: v.clone() for k, v in net.state_dict().items()}, [m.training for m in net.modules()]


def assert_unchanged(net, snap):
    state, modes = snap
    for k, v in net.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert [m.training for m in net.modules()] == modes


# -- bn_layers -----------------------------------------------------------------------------------
def test_bn_layers_forward_order():
    net = tiny()
    registered = [n for n, m in net.named_modules() if isinstance(m, nn.BatchNorm2d)]
    assert registered != TinyResNet.FORWARD_ORDER  # the case is meaningful
    assert bn_layers(net) == TinyResNet.FORWARD_ORDER
    assert bn_layers(net, images(3)) == TinyResNet.FORWARD_ORDER


def test_bn_layers_torchvision_resnet18():
    tv = pytest.importorskip("torchvision")
    net = tv.models.resnet18(num_classes=10)
    layers = bn_layers(net, torch.rand(1, 3, 32, 32))
    assert len(layers) == 20 and layers[0] == "bn1" and layers[-1] == "layer4.1.bn2"
    assert layers.index("layer2.0.downsample.1") == layers.index("layer2.0.bn2") + 1


def test_bn_layers_fallback_to_registration_order():
    class Picky(TinyResNet):
        def forward(self, x):
            if x.shape[-1] != 12:
                raise RuntimeError("needs 12x12 input")
            return super().forward(x)

    net = tiny(cls=Picky, calibrated=False)
    with pytest.warns(UserWarning, match="registration order"):
        layers = bn_layers(net)
    assert layers == [n for n, m in net.named_modules() if isinstance(m, nn.BatchNorm2d)]
    assert bn_layers(net, images(1, size=12)) == TinyResNet.FORWARD_ORDER


def test_bn_layers_without_bn_raises():
    net = nn.Sequential(nn.Conv2d(3, 2, 3), nn.Flatten(), nn.Linear(72, 2))
    with pytest.raises(ValueError, match="BatchNorm2d.*Sequential"):
        bn_layers(net)


# -- amplified forward ---------------------------------------------------------------------------
def test_amplified_forward_matches_in_place_copy_and_keeps_model():
    net = tiny()
    x = images(4)
    layers = TinyResNet.FORWARD_ORDER[-3:]
    snap = snapshot(net)
    with torch.no_grad():
        out = amplified_forward(net, x, layers, 1.7)
        ref = copy.deepcopy(net)
        for name in layers:
            ref.get_submodule(name).weight.mul_(1.7)
            ref.get_submodule(name).bias.mul_(1.7)
        torch.testing.assert_close(out, ref(x))
    assert_unchanged(net, snap)


def test_amplified_forward_gradients_reach_original_parameters():
    net = tiny()
    x = images(4)
    out = amplified_forward(net, x, ["block2.bn2", "block2.shortcut.1"], 1.5)
    F.cross_entropy(out, torch.tensor([0, 1, 2, 3])).backward()
    for name in ("block2.bn2", "block2.shortcut.1", "bn"):
        assert net.get_submodule(name).weight.grad.abs().sum() > 0
        assert net.get_submodule(name).bias.grad.abs().sum() > 0
    assert net.conv.weight.grad.abs().sum() > 0 and net.block2.conv2.weight.grad.abs().sum() > 0


def test_amplified_forward_train_mode_running_stats():
    net = tiny().train()
    before = snapshot(net)
    amplified_forward(net, images(4), ["block2.bn2"], 1.5)
    assert_unchanged(net, before)
    amplified_forward(net, images(4), ["block2.bn2"], 1.5, update_running_stats=True)
    assert not torch.equal(net.bn.running_mean, before[0]["bn.running_mean"])


# -- score ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("shared_prefix", [True, False])
@pytest.mark.parametrize("k,n,layer_range", [(1, 5, "paper"), (2, 3, "paper"), (1, 2, "published"), (3, 1, "published")])
def test_score_matches_reference(k, n, layer_range, shared_prefix):
    net = tiny()
    x = images(6)
    got = ibd_psc_score(net, x, k, omega=1.5, n=n, layer_range=layer_range, shared_prefix=shared_prefix)
    start = k if layer_range == "paper" else k + 1
    ref = reference_psc(net, x, range(start, start + n), 1.5, TinyResNet.FORWARD_ORDER)
    assert got.shape == (6,) and got.dtype == torch.float64
    torch.testing.assert_close(got.float(), ref.float(), rtol=0, atol=1e-5)


def test_layer_range_differs():
    net, x = tiny(), images(6)
    paper = ibd_psc_score(net, x, 1, n=2, layer_range="paper")
    published = ibd_psc_score(net, x, 1, n=2, layer_range="published")
    assert not torch.allclose(paper, published)
    with pytest.raises(ValueError, match="layer_range"):
        ibd_psc_score(net, x, 1, layer_range="code")


def test_clipping_warns_and_averages_available_layers():
    net, x = tiny(), images(5)
    with pytest.warns(UserWarning, match="clipping to 6"):
        got = ibd_psc_score(net, x, 5, n=5)
    ref = reference_psc(net, x, [5, 6], 1.5, TinyResNet.FORWARD_ORDER)
    torch.testing.assert_close(got.float(), ref.float(), rtol=0, atol=1e-5)
    assert amplified_layer_counts(5, 5, 6, warn=False) == [5, 6]
    assert amplified_layer_counts(6, 3, 6, "published", warn=False) == [6]
    with pytest.raises(ValueError, match="k must be at most"):
        amplified_layer_counts(7, 1, 6)


def test_shared_prefix_equals_straightforward_torchvision_resnet18():
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    net = randomize(tv.models.resnet18(num_classes=10)).eval()
    x = torch.rand(2, 3, 32, 32)
    layers = bn_layers(net, x)
    for k in (1, 4):
        a = ibd_psc_score(net, x, k, layers=layers, shared_prefix=True)
        b = ibd_psc_score(net, x, k, layers=layers, shared_prefix=False)
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_runner_splits_at_first_amplified_layer():
    net, x = tiny(), images(3)
    layers = TinyResNet.FORWARD_ORDER
    runner = amplification_runner(net, layers, "block2.bn1")
    prefix_modules = {n.target for n in runner.prefix.graph.nodes if n.op == "call_module"}
    suffix_modules = {n.target for n in runner.suffix.graph.nodes if n.op == "call_module"}
    assert {"conv", "bn", "block1.bn2", "block2.conv1"} <= prefix_modules
    assert {"block2.bn1", "block2.bn2", "block2.shortcut.1", "fc"} <= suffix_modules
    assert not prefix_modules & {"block2.bn1", "block2.bn2", "block2.shortcut.1"}
    # the runner shares the model's modules and parameters (no copies)
    assert runner.suffix.get_submodule("block2.bn2") is net.block2.bn2
    with torch.no_grad():
        out = run_amplified(runner, x, [[], layers[3:]], 2.0)
        torch.testing.assert_close(out[0], net(x))
        torch.testing.assert_close(out[1], amplified_forward(net, x, layers[3:], 2.0))
    with pytest.raises(ValueError, match="split point"):
        run_amplified(runner, x, [layers[2:]], 2.0)


def test_untraceable_model_falls_back_once(monkeypatch):
    monkeypatch.setattr(shared_prefix, "_FALLBACK_WARNED", set())
    net, x = tiny(cls=Untraceable), images(4)
    with pytest.warns(UserWarning, match="falling back"):
        got = ibd_psc_score(net, x, 2, n=3)
    torch.testing.assert_close(got.float(), reference_psc(net, x, [2, 3, 4], 1.5, TinyResNet.FORWARD_ORDER).float(), rtol=0, atol=1e-5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ibd_psc_score(net, x, 2, n=3)  # warned once only


# -- select_k ------------------------------------------------------------------------------------
def test_select_k_returns_first_k_above_xi():
    net, x = tiny(), images(40)
    with torch.no_grad():
        y = net(x).argmax(1)
    assert len(y.unique()) > 1
    omega = 1.5
    etas = reference_etas(net, x, y, omega, TinyResNet.FORWARD_ORDER)
    # a k > 1 whose rate exceeds every earlier one, with a later k exceeding xi too
    j = next(j for j in range(1, len(etas) - 1) if etas[j] > max(etas[:j]) and max(etas[j + 1 :]) > max(etas[:j]))
    xi = (max(etas[:j]) + etas[j]) / 2
    k, got = select_k(net, x, y, omega, xi)
    assert k == j + 1
    assert got == pytest.approx(etas[: j + 1])


def test_select_k_raises_with_rates_when_none_exceeds():
    # Conv(no bias)-BN-ReLU-pool-Linear(no bias): amplifying the only BN rescales the logits, nothing else
    torch.manual_seed(0)
    net = randomize(
        nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                      nn.Flatten(), nn.Linear(4, 3, bias=False))
    ).eval()
    x = torch.rand(20, 3, 8, 8)
    with torch.no_grad():
        y = net(x).argmax(1)
    with pytest.raises(ValueError, match=r"no k .*xi=0\.0.*η_1=0\.000.*Conv-BN-ReLU"):
        select_k(net, x, y, 1.5, 0.0)


def test_select_k_bad_inputs():
    net = tiny()
    with pytest.raises(ValueError, match="xi"):
        select_k(net, images(2), torch.tensor([0, 1]), 1.5, 1.5)
    with pytest.raises(ValueError, match="omega"):
        select_k(net, images(2), torch.tensor([0, 1]), 0.0, 0.5)


# -- detector ------------------------------------------------------------------------------------
def test_detector_fit_selects_k_and_round_trips():
    net, x = tiny(), images(30)
    with torch.no_grad():
        y = net(x).argmax(1)
    det = create_detector("ibd_psc", omega=1.5, xi=0.2, n=3, max_fit_samples=25)
    assert isinstance(det, IBDPSC) and det.requires_fit
    with pytest.raises(RuntimeError, match="fit"):
        det.score(net, x)
    det.fit(net, (x, y))
    keep = random_subset(30, 25, seed=0)  # a seeded random sample of 25, not the first 25
    k, etas = select_k(net, x[keep], y[keep], 1.5, 0.2)
    assert k > 1
    assert det.k == k and det.etas == pytest.approx(etas) and det.num_bn_layers == 6
    assert det.hparams()["k"] == k and det.state_dict()["k"] == k
    fresh = IBDPSC(omega=1.5, xi=0.2, n=3)
    fresh.load_state_dict(det.state_dict())
    assert fresh.fitted and fresh.k == k
    torch.testing.assert_close(fresh.score(net, x), det.score(net, x))
    with pytest.raises(ValueError, match="omega"):
        IBDPSC(omega=2.0).load_state_dict(det.state_dict())


def test_detector_score_leaves_model_and_rng_alone():
    net = tiny().train()
    snap = snapshot(net)
    det = IBDPSC(k=2, n=3)
    x = images(5)
    rng = torch.get_rng_state()
    scores = det.score(net, x)
    single = det.score(net, x[:1])
    assert_unchanged(net, snap)
    assert torch.equal(torch.get_rng_state(), rng)
    ref = reference_psc(net, x, [2, 3, 4], 1.5, TinyResNet.FORWARD_ORDER).float()
    torch.testing.assert_close(scores.float(), ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(single.float(), ref[:1], rtol=0, atol=1e-5)
    assert det.predict(net, x).dtype == torch.bool
    assert det.score(net, x[:0]).shape == (0,)


def test_detector_fixed_k_validation():
    net = tiny()
    det = IBDPSC(k=7)
    with pytest.raises(ValueError, match="k must be at most"):
        det.score(net, images(2))
    with pytest.raises(ValueError, match="k must be at most"):
        det.fit(net, (images(4), torch.zeros(4, dtype=torch.long)))
    IBDPSC(k=6).fit(net, (images(4), torch.zeros(4, dtype=torch.long)))


def test_detector_cache_is_weak_and_follows_the_model():
    det = IBDPSC(k=1, n=2)
    net, x = tiny(), images(3)
    det.score(net, x)
    # in-place weight change: the cached runner shares the parameters
    with torch.no_grad():
        net.block2.bn2.weight.mul_(0.5)
    ref = reference_psc(net, x, [1, 2], 1.5, TinyResNet.FORWARD_ORDER).float()
    torch.testing.assert_close(det.score(net, x).float(), ref, rtol=0, atol=1e-5)
    # structural change: a new BN module replaces the old one -> cache rebuilt
    net.block2.bn2 = randomize(nn.BatchNorm2d(8).double(), seed=3).eval()
    ref = reference_psc(net, x, [1, 2], 1.5, TinyResNet.FORWARD_ORDER).float()
    torch.testing.assert_close(det.score(net, x).float(), ref, rtol=0, atol=1e-5)
    pickle.loads(pickle.dumps(det))  # the cache does not travel
    copy.deepcopy(det)
    ref_net = weakref.ref(net)
    del net
    gc.collect()
    assert ref_net() is None, "the detector kept the model alive"


def test_detector_works_on_a_plain_module_and_torchvision_resnet():
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    net = tv.models.resnet18(num_classes=10).train()
    snap = snapshot(net)
    scores = IBDPSC(k=3).score(net, torch.rand(2, 3, 32, 32))
    assert scores.shape == (2,) and ((scores >= 0) & (scores <= 1)).all()
    assert_unchanged(net, snap)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"omega": 0}, "omega"),
        ({"n": 0}, "n"),
        ({"xi": 1.5}, "xi"),
        ({"threshold": "x"}, "threshold"),
        ({"k": 0}, "k"),
        ({"k": 1.5}, "k"),
        ({"layer_range": "code"}, "layer_range"),
        ({"max_fit_samples": 0}, "max_fit_samples"),
    ],
)
def test_detector_bad_arguments(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        IBDPSC(**kwargs)


def test_detector_bad_input():
    det = IBDPSC(k=1)
    with pytest.raises(ValueError, match="BatchNorm2d"):
        det.score(nn.Sequential(nn.Flatten(), nn.Linear(12, 2)), torch.rand(1, 3, 2, 2))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        det.score(tiny(), images(2) * 3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    net, x = tiny(), images(4)
    cpu = IBDPSC(k=2).score(net, x)
    gpu = IBDPSC(k=2).score(net.cuda(), x)
    assert gpu.device.type == "cuda"
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=0, atol=1e-5)
