import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_backdoor.losses import ScaleUpAdaptiveLoss


def tiny_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
        nn.Flatten(), nn.Linear(16, 3),
    ).double()


def batch(n: int = 6, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, 4, 4, generator=g, dtype=torch.float64) * 0.3
    original_y = torch.randint(3, (n,), generator=g)
    poisoned = torch.zeros(n, dtype=torch.bool)
    poisoned[::2] = True
    y = torch.where(poisoned, torch.zeros_like(original_y), original_y)
    return x, y, poisoned, original_y


@pytest.mark.parametrize("train", [True, False])
def test_matches_manual_computation(train):
    net = tiny_net().train(train)
    x, y, poisoned, original_y = batch()
    term = ScaleUpAdaptiveLoss(scales=(2, 3, 5), weight=0.7)
    torch.manual_seed(123)
    got = term(net, x, y, poisoned, original_y, 0)

    torch.manual_seed(123)
    n = torch.tensor([2.0, 3.0, 5.0], dtype=torch.float64)[torch.randint(3, (int(poisoned.sum()),))]
    ref_net = copy.deepcopy(net)
    scaled = (x[poisoned] * n.view(-1, 1, 1, 1)).clamp(0, 1)
    expected = 0.7 * F.cross_entropy(ref_net(scaled), original_y[poisoned])
    torch.testing.assert_close(got, expected)
    assert term.main_weight == 1.0 and term.skipped == 0


def test_gradients_flow_and_running_stats_untouched():
    net = tiny_net().train()
    state = {k: v.clone() for k, v in net.state_dict().items()}
    x, y, poisoned, original_y = batch()
    ScaleUpAdaptiveLoss()(net, x, y, poisoned, original_y, 0).backward()
    assert net[0].weight.grad.abs().sum() > 0 and net[1].weight.grad.abs().sum() > 0
    for k, v in net.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert all(m.training for m in net.modules())


def test_skips_batches_without_poisoned_samples():
    net = tiny_net()
    x, y, _, original_y = batch()
    term = ScaleUpAdaptiveLoss()
    assert term(net, x, y, torch.zeros(6, dtype=torch.bool), original_y, 0) is None
    assert term(net, x[:0], y[:0], torch.zeros(0, dtype=torch.bool), original_y[:0], 0) is None
    assert term.skipped == 2


@pytest.mark.parametrize(
    "kwargs,match",
    [({"scales": ()}, "scales"), ({"scales": (3, -1)}, "scales"), ({"scales": "35"}, "scales"),
     ({"weight": -1.0}, "weight"), ({"weight": "a"}, "weight")],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        ScaleUpAdaptiveLoss(**kwargs)


def test_bad_batch():
    net = tiny_net()
    x, y, poisoned, original_y = batch()
    term = ScaleUpAdaptiveLoss()
    with pytest.raises(ValueError, match="original_y"):
        term(net, x, y, poisoned, original_y[:2], 0)
    with pytest.raises(TypeError, match="poisoned"):
        term(net, x, y, poisoned.long(), original_y, 0)
