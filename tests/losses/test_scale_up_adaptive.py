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


def with_running_stats(net):
    with torch.no_grad():
        bn = net[1]
        bn.running_mean.uniform_(-0.2, 0.2)
        bn.running_var.uniform_(0.5, 1.5)
    return net


@pytest.mark.parametrize("train", [True, False])
def test_matches_a_direct_eval_mode_computation(train):
    net = with_running_stats(tiny_net()).train(train)
    x, y, poisoned, original_y = batch()
    term = ScaleUpAdaptiveLoss(scales=(2, 3, 5), weight=0.7)
    torch.manual_seed(123)
    got = term(net, x, y, poisoned, original_y, 0)

    torch.manual_seed(123)
    n = torch.tensor([2.0, 3.0, 5.0], dtype=torch.float64)[torch.randint(3, (int(poisoned.sum()),))]
    ref_net = copy.deepcopy(net).eval()  # the function SCALE-UP scores: BN on running statistics
    scaled = (x[poisoned] * n.view(-1, 1, 1, 1)).clamp(0, 1)
    # weight * (1/N) * sum over the poisoned samples, N = the whole batch (6), not the 3 poisoned
    expected = 0.7 * F.cross_entropy(ref_net(scaled), original_y[poisoned], reduction="sum") / len(x)
    torch.testing.assert_close(got, expected)
    assert term.main_weight == 1.0 and term.skipped == 0
    assert all(m.training == train for m in net.modules())


def test_train_mode_would_undo_the_scaling_the_term_does_not():
    """BN in train mode normalises each channel of the scaled batch: the scaling mostly vanishes."""
    net = with_running_stats(tiny_net()).train()
    x, y, poisoned, original_y = batch()
    got = {}
    for s in (2, 5):
        got[s] = float(ScaleUpAdaptiveLoss(scales=(s,))(net, x, y, poisoned, original_y, 0))
    assert abs(got[2] - got[5]) > 1e-3
    ref = copy.deepcopy(net).eval()
    for s in (2, 5):
        expected = F.cross_entropy(ref((x[poisoned] * s).clamp(0, 1)), original_y[poisoned], reduction="sum") / len(x)
        assert got[s] == pytest.approx(float(expected))


def test_scale_draw_all_is_the_mean_over_the_scales():
    net = with_running_stats(tiny_net()).train()
    x, y, poisoned, original_y = batch()
    got = ScaleUpAdaptiveLoss(scales=(2, 3, 5), weight=0.5, scale_draw="all")(net, x, y, poisoned, original_y, 0)
    ref = copy.deepcopy(net).eval()
    per_scale = [F.cross_entropy(ref((x[poisoned] * s).clamp(0, 1)), original_y[poisoned], reduction="sum") / len(x)
                 for s in (2, 3, 5)]
    torch.testing.assert_close(got, 0.5 * torch.stack(per_scale).mean())


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
     ({"weight": -1.0}, "weight"), ({"weight": "a"}, "weight"), ({"scale_draw": "one"}, "scale_draw")],
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
