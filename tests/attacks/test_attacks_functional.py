"""The pure-torch trigger functions against direct computations of their formulas."""

from __future__ import annotations

import pytest
import torch

from lightning_backdoor.attacks import functional as AF

SHAPES = [(1, 28, 28), (3, 32, 32), (3, 64, 64), (3, 24, 40), (1, 31, 17)]


def _rand(*shape, seed=0, dtype=torch.float32):
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# -- seeded randomness ---------------------------------------------------------------------------
def test_seeded_rand_is_reproducible_and_leaves_global_rng_alone():
    state = torch.get_rng_state()
    a, b, c = AF.seeded_rand((3, 4, 4), 0), AF.seeded_rand((3, 4, 4), 0), AF.seeded_rand((3, 4, 4), 1)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.min() >= 0 and a.max() < 1


# -- locations -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "location, expected",
    [("top_left", (0, 0)), ("top_right", (0, 37)), ("bottom_left", (29, 0)), ("bottom_right", (29, 37)), ((5, 7), (5, 7))],
)
def test_resolve_location(location, expected):
    assert AF.resolve_location(location, 3, (32, 40)) == expected


def test_resolve_location_errors():
    with pytest.raises(ValueError, match="patch_size .* larger than the image size"):
        AF.resolve_location("top_left", 33, 32)
    with pytest.raises(ValueError, match="location"):
        AF.resolve_location((30, 0), 3, 32)
    with pytest.raises(ValueError, match="location must be one of"):
        AF.resolve_location("center", 3, 32)
    with pytest.raises(TypeError, match="location"):
        AF.resolve_location((1.5, 2), 3, 32)


# -- stamp_patch ---------------------------------------------------------------------------------
def test_stamp_patch_bottom_right_exact():
    x = _rand(4, 3, 32, 32)
    patch = _rand(3, 3, 3, seed=1)
    out = AF.stamp_patch(x, patch, location="bottom_right")
    assert torch.equal(out[:, :, -3:, -3:], patch.expand(4, -1, -1, -1))
    unchanged = torch.ones(32, 32, dtype=torch.bool)
    unchanged[-3:, -3:] = False
    assert torch.equal(out[:, :, unchanged], x[:, :, unchanged])
    assert not torch.equal(out, x)  # x is not modified in place
    assert torch.equal(x, _rand(4, 3, 32, 32))


def test_stamp_patch_mask_formula_and_broadcast():
    x = _rand(2, 3, 10, 12)
    patch = _rand(4, 5, seed=1)  # [p, q] broadcast over channels
    mask = _rand(4, 5, seed=2)
    out = AF.stamp_patch(x, patch, mask, location=(3, 6))
    expected = x.clone()
    expected[:, :, 3:7, 6:11] = (1 - mask) * x[:, :, 3:7, 6:11] + mask * patch
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-7)


def test_stamp_patch_full_image_form():
    x = _rand(2, 1, 8, 8)
    patch, mask = _rand(1, 8, 8, seed=1), (_rand(1, 8, 8, seed=2) > 0.5).float()
    out = AF.stamp_patch(x, patch, mask)
    assert torch.equal(out, torch.where(mask.bool(), patch, x))
    with pytest.raises(ValueError, match="needs a location"):
        AF.stamp_patch(x, torch.ones(3, 3))


def test_stamp_patch_errors():
    x = _rand(1, 3, 8, 8)
    with pytest.raises(ValueError, match="patch has 2 channels"):
        AF.stamp_patch(x, torch.ones(2, 3, 3), location="top_left")
    with pytest.raises(ValueError, match="patch_size"):
        AF.stamp_patch(x, torch.ones(3, 9, 3), location="top_left")
    with pytest.raises(ValueError, match="mask"):
        AF.stamp_patch(x, torch.ones(3, 3, 3), torch.ones(2, 2), location="top_left")


# -- blend ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("alpha", [0.05, 0.2, 1.0])
def test_blend_matches_direct_computation(alpha):
    x, p = _rand(3, 3, 16, 16), _rand(3, 16, 16, seed=1)
    torch.testing.assert_close(AF.blend(x, p, alpha), (1 - alpha) * x + alpha * p)
    gray = _rand(16, 16, seed=2)
    torch.testing.assert_close(AF.blend(x, gray, alpha), (1 - alpha) * x + alpha * gray.expand(3, -1, -1))


def test_blend_pattern_shape_error():
    with pytest.raises(ValueError, match="pattern of shape"):
        AF.blend(_rand(1, 3, 16, 16), _rand(3, 8, 8), 0.2)


def test_resize_pattern():
    p = _rand(3, 64, 64)
    r = AF.resize_pattern(p, 32, 24)
    assert r.shape == (3, 32, 24) and r.min() >= 0 and r.max() <= 1
    assert AF.resize_pattern(p, 64, 64) is p


# -- WaNet ---------------------------------------------------------------------------------------
def test_wanet_noise_normalised_and_seeded():
    n = AF.wanet_noise(4, generator=AF.seeded_generator(0))
    assert n.shape == (2, 4, 4)
    torch.testing.assert_close(n.abs().mean(), torch.tensor(1.0))
    assert torch.equal(n, AF.wanet_noise(4, generator=AF.seeded_generator(0)))
    assert not torch.equal(n, AF.wanet_noise(4, generator=AF.seeded_generator(1)))
    with pytest.raises(ValueError, match="k must be >= 2"):
        AF.wanet_noise(1)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_wanet_zero_strength_is_identity(shape, dtype):
    x = _rand(2, *shape, dtype=dtype)
    noise = AF.wanet_noise(4, generator=AF.seeded_generator(0))
    grid = AF.wanet_grid(noise, shape[1], shape[2], s=0.0)
    out = AF.warp(x, grid)
    assert out.dtype == dtype
    torch.testing.assert_close(out, x, rtol=0, atol=1e-6)


@pytest.mark.parametrize("shape", SHAPES)
def test_wanet_warp_changes_image_keeps_range(shape):
    x = _rand(2, *shape)
    grid = AF.wanet_grid(AF.wanet_noise(4, generator=AF.seeded_generator(0)), shape[1], shape[2], s=0.5)
    assert grid.shape == (1, shape[1], shape[2], 2) and grid.abs().max() <= 1
    out = AF.warp(x, grid)
    assert out.shape == x.shape and out.min() >= 0 and out.max() <= 1
    assert (out - x).abs().max() > 1e-3


def test_wanet_grid_is_identity_plus_scaled_field():
    noise = AF.wanet_noise(4, generator=AF.seeded_generator(0))
    g0 = AF.wanet_grid(noise, 16, 20, s=0.0)
    g1 = AF.wanet_grid(noise, 16, 20, s=0.5, mode="bilinear")
    field = torch.nn.functional.interpolate(noise[None].double(), size=(16, 20), mode="bilinear", align_corners=True)
    expected = (g0[0] + field[0].permute(1, 2, 0) * torch.tensor([0.5 / 20, 0.5 / 16], dtype=torch.float64)).clamp(-1, 1)
    torch.testing.assert_close(g1[0], expected)


def test_wanet_noise_grid_seeded_and_bounded():
    grid = AF.wanet_grid(AF.wanet_noise(4, generator=AF.seeded_generator(0)), 12, 10, s=0.5)
    a = AF.wanet_noise_grid(grid, 3, generator=torch.Generator().manual_seed(5))
    b = AF.wanet_noise_grid(grid, 3, generator=torch.Generator().manual_seed(5))
    assert a.shape == (3, 12, 10, 2) and torch.equal(a, b)
    assert not torch.equal(a[0], a[1])
    assert a.abs().max() <= 1
    delta = (a - grid).abs()
    assert delta[..., 0].max() <= 1 / 10 + 1e-9 and delta[..., 1].max() <= 1 / 12 + 1e-9


def test_warp_errors():
    x = _rand(2, 3, 8, 8)
    with pytest.raises(ValueError, match="grid must have shape"):
        AF.warp(x, torch.zeros(3, 8, 8, 2))
    with pytest.raises(ValueError, match="noise must be a"):
        AF.wanet_grid(torch.zeros(3, 4, 4), 8, 8)
