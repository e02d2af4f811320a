"""Feature spaces: pixels, a model's penultimate features (against the model's own forward_features), batching."""

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from lightning_backdoor.attacks import WaNet
from lightning_backdoor.data import PoisonedDataset
from lightning_backdoor.data.datasets import TensorImageDataset
from lightning_backdoor.models import create_model
from lightning_backdoor.sanitizers import ModelFeatures, PixelFeatures, extract_features


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def images(n=10, seed=0):
    return torch.rand(n, 1, 28, 28, generator=torch.Generator().manual_seed(seed))


def test_pixel_features_are_the_flattened_images():
    x = images()
    assert torch.equal(PixelFeatures()(x), x.flatten(1))


def test_penultimate_features_equal_the_models_forward_features():
    torch.manual_seed(0)
    net = create_model("resnet20", num_classes=10, in_channels=1)
    net.train()
    x = images(6)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    feats = ModelFeatures(net)(x)
    assert net.training  # the caller's mode is restored
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in before.items())  # BN statistics untouched
    net.eval()
    with torch.no_grad():
        assert torch.allclose(feats, net.forward_features(x), atol=1e-6)
    named = ModelFeatures(net, layer="layer3")(x)
    assert named.shape == (6, 64 * 7 * 7)


def test_model_features_without_a_linear_head_need_a_layer():
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten())
    with pytest.raises(ValueError, match="no nn.Linear head"):
        ModelFeatures(net)
    with pytest.raises(ValueError, match="not a submodule"):
        ModelFeatures(net, layer="fc")
    assert ModelFeatures(net, layer="1")(images(3)).shape == (3, 2 * 26 * 26)


def test_extract_features_batches_and_keeps_sample_fields_and_rng():
    base = TensorImageDataset((images(37) * 255).to(torch.uint8), torch.arange(37) % 10)
    ds = PoisonedDataset(base, WaNet(k=4, cross_ratio=2.0), target=0, num_classes=10, rate=0.2, seed=0)
    ds.attack.build(1, 28, 28)
    rng = torch.get_rng_state()
    out = extract_features(ds, PixelFeatures(), batch_size=8)
    assert torch.equal(torch.get_rng_state(), rng)  # WaNet cover samples draw random numbers while loading
    assert out.features.shape == (37, 784)
    assert torch.equal(out.index, torch.arange(37))
    assert torch.equal(out.poisoned, ds._poison_mask) and bool(out.poisoned.any())
    assert torch.equal(out.labels[out.poisoned], torch.zeros(int(out.poisoned.sum()), dtype=torch.long))
    # poisoned samples are featurised with their trigger; the batch size does not change anything
    i = int(ds.poison_indices[0])
    assert torch.equal(out.features[i], ds[i].x.flatten())
    clean = ~out.poisoned & ~ds._cover_mask
    again = extract_features(DataLoader(ds, batch_size=5), PixelFeatures())
    assert torch.equal(again.features[clean], out.features[clean])
