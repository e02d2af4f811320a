"""Every registered detector honours the common interface (parametrised over the registry)."""

import warnings

import pytest
import torch
from torch import nn

from lightning_backdoor.detectors import Detector, create_detector, list_detectors


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_cnn(k: int = 4) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.2),
        nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, k),
    )


@pytest.mark.parametrize("name", list_detectors())
def test_detector_contract(name):
    det = create_detector(name)
    assert isinstance(det, Detector) and det.name == name
    net = tiny_cnn().train()
    state = {k: v.clone() for k, v in net.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    benign = (torch.rand(16, 3, 8, 8, generator=g), torch.arange(16) % 4)
    x = torch.rand(5, 3, 8, 8, generator=g)
    x0 = x.clone()
    rng = torch.get_rng_state()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        det.fit(net, benign)
        scores = det.score(net, x)
        single = det.score(net, x[:1])
        flags = det.predict(net, x)
    assert scores.shape == (5,) and torch.is_floating_point(scores) and torch.isfinite(scores).all()
    assert single.shape == (1,)
    assert flags.shape == (5,) and flags.dtype == torch.bool
    assert torch.equal(x, x0)
    assert all(m.training for m in net.modules())
    for k, v in net.state_dict().items():
        assert torch.equal(v, state[k]), f"{name} changed {k}"
    assert torch.equal(torch.get_rng_state(), rng), f"{name} used the global RNG"
    fresh = create_detector(name)
    fresh.load_state_dict(det.state_dict())
    assert fresh.fitted and fresh.threshold == det.threshold
    assert isinstance(det.hparams(), dict) and repr(det).startswith(type(det).__name__)
