"""Every registered sanitiser honours the common interface (parametrised over the registry and both modes)."""

import pickle

import pytest
import torch

from lightning_backdoor.sanitizers import MODES, Sanitizer, SanitizeResult, create_sanitizer, list_sanitizers


def blobs(n=60, d=6, k=3, seed=0, shift=4.0):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % k
    x = torch.randn(n, d, generator=g) + shift * torch.nn.functional.one_hot(y, d).float()
    return x, y


def test_registry_has_the_paper_defences():
    assert {"sphere", "slab", "sphere_slab"} <= set(list_sanitizers())
    assert list_sanitizers("sl*") == ["slab"]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", list_sanitizers())
def test_sanitizer_contract(name, mode):
    san = create_sanitizer(name, mode=mode)
    assert isinstance(san, Sanitizer) and san.name == name and san.mode == mode
    x, y = blobs()
    clean = blobs(seed=1)
    outlier = torch.full((1, x.shape[1]), 40.0)
    x = torch.cat([x, outlier])
    y = torch.cat([y, torch.tensor([0])])
    rng = torch.get_rng_state()
    result = san.sanitize(x, y, clean=clean if mode == "oracle" else None)
    assert torch.equal(torch.get_rng_state(), rng)  # never consumes the caller's random stream
    assert isinstance(result, SanitizeResult)
    keep, scores = result
    assert keep.dtype == torch.bool and keep.shape == (len(x),)
    assert torch.is_floating_point(scores) and scores.shape == (len(x),) and not bool(torch.isnan(scores).any())
    assert torch.equal(keep, scores <= 1)
    assert torch.equal(san.keep(x, y), keep) and torch.allclose(san.score(x, y), scores)
    assert not bool(keep[-1]) and float(scores[-1]) > float(scores[:-1].max())  # the far outlier is the most outlying
    assert 0 < int(keep.sum()) < len(x)

    # fitted state: tensors and plain values, restored into a fresh instance with the same scores
    state = san.state_dict()
    assert all(isinstance(v, (torch.Tensor, bool, int, float, str)) for v in state.values())
    fresh = create_sanitizer(name, mode=mode)
    fresh.load_state_dict(pickle.loads(pickle.dumps(state)))
    assert torch.allclose(fresh.score(x, y), scores)
    hp = san.hparams()
    assert hp["mode"] == mode and isinstance(repr(san), str)


@pytest.mark.parametrize("name", list_sanitizers())
def test_unfitted_sanitizer_refuses_to_score(name):
    with pytest.raises(RuntimeError, match="must be fitted"):
        create_sanitizer(name).score(*blobs())


@pytest.mark.parametrize("name", list_sanitizers())
def test_percentile_100_keeps_every_fitting_sample(name):
    x, y = blobs()
    san = create_sanitizer(name, percentile=100).fit(x, y)
    assert bool(san.keep(x, y).all())
    # a lower percentile keeps at most that share of the fitting samples of each class (fewer when two sets
    # must hold at once)
    san = create_sanitizer(name, percentile=50).fit(x, y)
    for k in range(3):
        members = y == k
        kept = int(san.keep(x[members], y[members]).sum())
        assert 0 < kept <= 0.5 * int(members.sum()) + 1
