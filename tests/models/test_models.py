"""Tests of the model registry and every registered architecture (small variants, seconds overall)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.fx
from torch import nn

from lightning_backdoor.models import (
    DATASET_STATS,
    MODELS,
    BadNetsCNN,
    CifarResNet,
    Normalize,
    SmallCNN,
    VGG,
    create_model,
    list_models,
)

ALL = list_models()
NUM_CLASSES = 5


def small_kwargs(name: str, size: int = 32) -> dict:
    """Cheap settings per model; models registered later without an entry get their defaults."""
    table = {
        "badnets_cnn": {"input_size": size},
        "small_cnn": {"width": 8},
        "resnet18": {"width": 8},
        "resnet34": {"width": 4},
        "resnet20": {"width": 4},
        "vgg11_bn": {"width_div": 16},
        "vgg16_bn": {"width_div": 16},
        "vgg19_bn": {"width_div": 16},
    }
    return dict(table.get(name, {}))


def make(name: str, in_channels: int = 3, size: int = 32, **kw) -> nn.Module:
    torch.manual_seed(0)
    return create_model(name, num_classes=NUM_CLASSES, in_channels=in_channels, **small_kwargs(name, size), **kw)


def n_bn(model: nn.Module) -> int:
    return sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())


# -- registry ----------------------------------------------------------------------------------


def test_registered_names():
    expected = {"badnets_cnn", "small_cnn", "resnet18", "resnet34", "resnet20", "vgg16_bn", "vgg19_bn"}
    assert expected <= set(ALL)
    assert list_models("resnet*") == ["resnet18", "resnet20", "resnet34"]
    assert list_models("VGG*") == ["vgg11_bn", "vgg16_bn", "vgg19_bn"]
    assert "ResNet18" in MODELS


def test_unknown_name_lists_known_names():
    with pytest.raises(ValueError, match="unknown model 'resnet5'") as info:
        create_model("resnet5")
    for name in ALL:
        assert name in str(info.value)


def test_unknown_kwarg_names_model_and_accepted():
    with pytest.raises(TypeError, match=r"'resnet18'.*\['input_size'\].*width"):
        create_model("resnet18", input_size=32)


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("bad", [1, 0, -3, 2.0, True, "10", None])
def test_bad_num_classes(name, bad):
    with pytest.raises((TypeError, ValueError), match="num_classes"):
        create_model(name, num_classes=bad, **small_kwargs(name))


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("bad", [0, -1, 1.5, False, "3"])
def test_bad_in_channels(name, bad):
    with pytest.raises((TypeError, ValueError), match="in_channels"):
        create_model(name, in_channels=bad, **small_kwargs(name))


def test_bad_mean_std():
    with pytest.raises(ValueError, match="together"):
        create_model("small_cnn", mean=(0.5, 0.5, 0.5))
    with pytest.raises(ValueError, match=r"mean must have 1 or in_channels=1"):
        create_model("small_cnn", in_channels=1, **DATASET_STATS["cifar10"])
    with pytest.raises(ValueError, match="std must be > 0"):
        create_model("small_cnn", mean=0.5, std=(0.2, 0.0, 0.2))


# -- every registered model --------------------------------------------------------------------


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("size", [28, 32])
def test_forward_shape_and_attributes(name, channels, size):
    net = make(name, in_channels=channels, size=size).eval()
    x = torch.rand(2, channels, size, size)
    with torch.no_grad():
        out = net(x)
        feats = net.forward_features(x)
    assert out.shape == (2, NUM_CLASSES) and out.dtype == x.dtype
    assert torch.isfinite(out).all()
    assert net.num_classes == NUM_CLASSES and net.in_channels == channels
    assert isinstance(net.normalize, Normalize) and net.normalize.num_channels == channels
    assert isinstance(net.fc, nn.Linear) and net.fc.out_features == NUM_CLASSES
    assert feats.shape == (2, net.num_features)
    torch.testing.assert_close(net.fc(feats), out)
    assert not any(isinstance(m, nn.modules.lazy.LazyModuleMixin) for m in net.modules())


@pytest.mark.parametrize("name", ALL)
def test_fx_symbolic_trace_matches_module(name):
    net = make(name).eval()
    traced = torch.fx.symbolic_trace(net)
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(traced(x), net(x))
    # Every BN layer appears once as its own call_module node, so a detector can split the graph
    # at a chosen BN layer (IBD-PSC).
    bn_names = [n for n, m in net.named_modules() if isinstance(m, nn.BatchNorm2d)]
    called = [node.target for node in traced.graph.nodes if node.op == "call_module"]
    assert sorted(t for t in called if t in bn_names) == sorted(bn_names)
    # Train mode (batch statistics) traces the same way.
    net.train(), traced.train()
    torch.testing.assert_close(traced(x), net(x))


@pytest.mark.parametrize("name", ALL)
def test_normalize_is_inside_the_model(name):
    stats = DATASET_STATS["cifar10"]
    net = make(name, **stats).eval()
    plain = copy.deepcopy(net)
    plain.normalize.mean.zero_()
    plain.normalize.std.fill_(1.0)
    x = torch.rand(2, 3, 32, 32)
    mean = torch.tensor(stats["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(stats["std"]).view(1, 3, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(net(x), plain((x - mean) / std))
        assert not torch.allclose(net(x), plain(x))
    # The statistics travel with the weights in the checkpoint.
    assert {"normalize.mean", "normalize.std"} <= set(net.state_dict())
    fresh = make(name)
    fresh.load_state_dict(net.state_dict())
    torch.testing.assert_close(fresh.normalize.std.flatten(), std.flatten())


@pytest.mark.parametrize("name", ALL)
def test_default_normalisation_is_identity(name):
    net = make(name, in_channels=1)
    assert torch.equal(net.normalize.mean, torch.zeros(1, 1, 1))
    assert torch.equal(net.normalize.std, torch.ones(1, 1, 1))


@pytest.mark.parametrize("name", ALL)
def test_gradients_flow(name):
    net = make(name, size=16).train()
    x = torch.rand(3, 3, 16, 16, requires_grad=True)
    y = torch.arange(3) % NUM_CLASSES
    nn.functional.cross_entropy(net(x), y).backward()
    for pname, p in net.named_parameters():
        assert p.grad is not None, pname
        assert torch.isfinite(p.grad).all(), pname
    assert net.fc.weight.grad.abs().sum() > 0
    assert x.grad is not None and x.grad.abs().sum() > 0  # input gradients (trigger reverse-engineering)


@pytest.mark.parametrize("name", ALL)
def test_train_batch_two_and_eval_batch_one(name):
    net = make(name, size=28)
    net.train()
    assert net(torch.rand(2, 3, 28, 28)).shape == (2, NUM_CLASSES)
    net.eval()
    with torch.no_grad():
        assert net(torch.rand(1, 3, 28, 28)).shape == (1, NUM_CLASSES)


@pytest.mark.parametrize("name", ALL)
def test_wrong_input_channels_or_rank_rejected(name):
    net = make(name, in_channels=3).eval()
    with pytest.raises(ValueError, match="in_channels=3"):
        net(torch.rand(2, 1, 32, 32))  # would otherwise broadcast silently through Normalize
    with pytest.raises(ValueError, match=r"\[N, C, H, W\]"):
        net(torch.rand(3, 32, 32))


@pytest.mark.parametrize("name", ALL)
def test_device_and_dtype_follow_the_module(name):
    net = make(name, size=16).eval().double()
    with torch.no_grad():
        out = net(torch.rand(2, 3, 16, 16, dtype=torch.float64))
    assert out.dtype == torch.float64
    meta = net.to("meta")
    assert meta(torch.rand(2, 3, 16, 16, device="meta")).device.type == "meta"


@pytest.mark.parametrize("name", ALL)
def test_same_seed_same_weights(name):
    a, b = make(name), make(name)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)


# -- architecture details ----------------------------------------------------------------------


def test_resnet18_paper_size():
    net = create_model("resnet18")
    assert n_bn(net) == 20  # stem + 16 in blocks + 3 shortcut projections
    n_params = sum(p.numel() for p in net.parameters())
    assert n_params == pytest.approx(11.17e6, rel=2e-3)
    assert isinstance(net, CifarResNet) and net.conv1.kernel_size == (3, 3) and net.conv1.stride == (1, 1)
    assert not any(isinstance(m, nn.MaxPool2d) for m in net.modules())
    assert [net.layer1[0].conv1.out_channels, net.layer4[0].conv1.out_channels] == [64, 512]


def test_resnet_depths_and_widths():
    r34 = create_model("resnet34", width=8)
    assert [len(getattr(r34, f"layer{i}")) for i in range(1, 5)] == [3, 4, 6, 3]
    assert r34.layer4[0].conv1.out_channels == 64
    r20 = create_model("resnet20")
    assert [len(getattr(r20, f"layer{i}")) for i in range(1, 4)] == [3, 3, 3]
    assert not hasattr(r20, "layer4")
    convs3 = [m for m in r20.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]
    assert len(convs3) == 19  # 19 conv + 1 fc = the 20 weighted layers of ResNet-20
    assert [r20.layer1[0].conv1.out_channels, r20.layer3[0].conv1.out_channels] == [16, 64]
    assert sum(p.numel() for p in r20.parameters()) < 0.3e6
    assert isinstance(r20.layer2[0].shortcut[0], nn.Conv2d) and r20.layer2[0].shortcut[0].kernel_size == (1, 1)
    assert isinstance(r20.layer1[0].shortcut, nn.Identity)


def test_vgg_structure():
    v16, v19 = create_model("vgg16_bn", width_div=8), create_model("vgg19_bn", width_div=8)
    assert isinstance(v16, VGG) and n_bn(v16) == 13 and n_bn(v19) == 16
    assert v16.fc.in_features == 64 and VGG(11).fc.in_features == 512
    head = create_model("vgg16_bn", width_div=8, hidden_dim=32)
    assert head.num_features == 32 and head(torch.rand(2, 3, 32, 32)).shape == (2, 10)
    for size in (16, 20):  # ceil-mode pooling: any input size works
        assert v16.eval()(torch.rand(1, 3, size, size)).shape == (1, 10)
    with pytest.raises(ValueError, match="depth"):
        VGG(depth=17)


def test_badnets_cnn_structure():
    net = BadNetsCNN(in_channels=1)
    assert n_bn(net) == 0
    assert (net.conv1.out_channels, net.conv1.kernel_size, net.conv2.out_channels) == (16, (5, 5), 32)
    assert net.fc1.in_features == 32 * 4 * 4 and net.fc1.out_features == 512
    assert BadNetsCNN(input_size=32).fc1.in_features == 32 * 5 * 5
    assert BadNetsCNN(input_size=(28, 32)).fc1.in_features == 32 * 4 * 5
    with pytest.raises(ValueError, match="input_size=\\(28, 28\\)"):
        net(torch.rand(1, 1, 32, 32))
    with pytest.raises(ValueError, match="at least 16"):
        BadNetsCNN(input_size=12)
    with pytest.raises(TypeError, match="input_size"):
        BadNetsCNN(input_size="28")


def test_small_cnn_any_size():
    net = SmallCNN(width=4).eval()
    assert n_bn(net) == 6
    for size in (8, 13, 64):
        assert net(torch.rand(1, 3, size, size)).shape == (1, 10)
