"""Tests of ``Normalize`` and ``DATASET_STATS``."""

from __future__ import annotations

import pytest
import torch
import torch.fx

from lightning_backdoor.models import DATASET_STATS, Normalize


def test_matches_formula_any_channels():
    mean, std = [0.1, 0.2, 0.3, 0.4, 0.5], [0.5, 0.4, 0.3, 0.2, 0.1]
    norm = Normalize(mean, std)
    x = torch.rand(2, 5, 4, 4)
    expected = (x - torch.tensor(mean).view(1, 5, 1, 1)) / torch.tensor(std).view(1, 5, 1, 1)
    torch.testing.assert_close(norm(x), expected)
    torch.testing.assert_close(norm(x[0]), expected[0])  # a single [C, H, W] image
    torch.testing.assert_close(norm.inverse(norm(x)), x)
    assert norm.num_channels == 5


def test_scalar_and_tensor_arguments():
    torch.testing.assert_close(Normalize(0.5, 0.5)(torch.ones(1, 3, 2, 2)), torch.ones(1, 3, 2, 2))
    norm = Normalize(torch.tensor([0.0, 1.0]), torch.tensor([1.0, 2.0]))
    assert norm.mean.shape == (2, 1, 1)


def test_identity():
    x = torch.rand(2, 3, 4, 4)
    assert torch.equal(Normalize.identity(3)(x), x)


@pytest.mark.parametrize(
    "mean, std, exc, match",
    [
        ([0.5, 0.5], [0.5], ValueError, "same length"),
        ([0.5], [0.0], ValueError, "std must be > 0"),
        ([0.5, 0.5], [0.5, -1.0], ValueError, "std must be > 0"),
        ([], [], ValueError, "at least one"),
        ("0.5", [0.5], TypeError, "mean"),
        ([0.5], [float("nan")], TypeError, "std"),
        ([True], [1.0], TypeError, "mean"),
        (None, [1.0], TypeError, "mean"),
    ],
)
def test_validation(mean, std, exc, match):
    with pytest.raises(exc, match=match):
        Normalize(mean, std)


def test_buffers_follow_module_and_are_saved():
    norm = Normalize(**DATASET_STATS["cifar10"])
    assert set(norm.state_dict()) == {"mean", "std"}
    assert list(norm.parameters()) == []
    norm = norm.double()
    assert norm(torch.rand(1, 3, 2, 2, dtype=torch.float64)).dtype == torch.float64


def test_fx_traceable():
    norm = Normalize(**DATASET_STATS["gtsrb"])
    x = torch.rand(2, 3, 8, 8)
    torch.testing.assert_close(torch.fx.symbolic_trace(norm)(x), norm(x))


def test_dataset_stats():
    for key in ("mnist", "cifar10", "gtsrb", "imagenet"):
        stats = DATASET_STATS[key]
        assert set(stats) == {"mean", "std"}
        assert len(stats["mean"]) == len(stats["std"]) == (1 if key == "mnist" else 3)
        assert all(0 < m < 1 for m in stats["mean"]) and all(0 < s < 1 for s in stats["std"])
        Normalize(**stats)
    assert DATASET_STATS["imagenette"] == DATASET_STATS["tiny_imagenet"] == DATASET_STATS["imagenet"]
