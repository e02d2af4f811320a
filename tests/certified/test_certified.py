"""The certified bound: the exact inner maximiser against brute force, the bound against its candidate attack and
against independent feasible attacks, monotonicity in ε, and the data-dependent variant."""

import math

import pytest
import torch

from lightning_backdoor.certified import (FeasibleSet, bound_curve, certify, certify_data_dependent, evaluate_linear,
                                          feasible_set, get_loss, min_linear_ball_slab, train_linear)
from lightning_backdoor.sanitizers import SphereSlab


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def sample_ball_slab(r, v, s, n, g):
    """Points of {‖u‖ ≤ r, |⟨v, u⟩| ≤ s}: uniform in the ball, on its surface, and on the slab faces."""
    d = len(v)
    dirs = torch.randn(n, d, generator=g, dtype=torch.float64)
    dirs = dirs / dirs.norm(dim=1, keepdim=True)
    inside = dirs * r * torch.rand(n, 1, generator=g, dtype=torch.float64) ** (1 / d)
    pts = [inside, dirs * r]
    vn = float(v.norm())
    if math.isfinite(s) and vn > 0:
        vh, t = v / vn, s / vn
        if t < r:
            perp = dirs - (dirs @ vh)[:, None] * vh
            perp = perp / perp.norm(dim=1, keepdim=True).clamp_min(1e-12)
            width = math.sqrt(r * r - t * t) * torch.rand(n, 1, generator=g, dtype=torch.float64) ** (1 / max(d - 1, 1))
            for side in (t, -t):
                pts.append(side * vh + width * perp)
                pts.append(side * vh + math.sqrt(r * r - t * t) * perp)
    pts = torch.cat(pts)
    return pts[(pts @ v).abs() <= s + 1e-12] if math.isfinite(s) else pts


def random_problem(d, g, slab_scale):
    c = torch.randn(d, generator=g, dtype=torch.float64)
    v = torch.randn(d, generator=g, dtype=torch.float64)
    r = 0.5 + 2 * float(torch.rand(1, generator=g))
    s = slab_scale * r * float(v.norm()) * float(torch.rand(1, generator=g))
    return c, r, v, s


@pytest.mark.parametrize("d", [2, 3])
@pytest.mark.parametrize("slab_scale", [0.3, 1.0, math.inf])
def test_inner_maximiser_matches_brute_force(d, slab_scale):
    g = torch.Generator().manual_seed(d * 10 + int(slab_scale if math.isfinite(slab_scale) else 7))
    for _ in range(6):
        c, r, v, s = random_problem(d, g, slab_scale)
        u = min_linear_ball_slab(c, r, v, s)
        assert float(u.norm()) <= r * (1 + 1e-9) and float((u @ v).abs()) <= s * (1 + 1e-9) + 1e-12  # feasible
        pts = sample_ball_slab(r, v, s, 20_000 if d == 2 else 60_000, g)
        best = float((pts @ c).min())
        assert float(u @ c) <= best + 1e-9                       # no sampled feasible point is better
        assert best - float(u @ c) <= 2e-2 * r * float(c.norm())  # and the dense sample gets close to it


def test_inner_maximiser_edge_cases():
    v = torch.tensor([1.0, 0.0], dtype=torch.float64)
    # c along the slab direction: the slab caps it
    assert torch.allclose(min_linear_ball_slab(torch.tensor([2.0, 0.0], dtype=torch.float64), 1.0, v, 0.25),
                          torch.tensor([-0.25, 0.0], dtype=torch.float64))
    # c orthogonal to it: the slab does not bind
    assert torch.allclose(min_linear_ball_slab(torch.tensor([0.0, 3.0], dtype=torch.float64), 1.0, v, 0.25),
                          torch.tensor([0.0, -1.0], dtype=torch.float64))
    assert torch.equal(min_linear_ball_slab(torch.zeros(2, dtype=torch.float64), 1.0, v, 0.5), torch.zeros(2, dtype=torch.float64))
    assert torch.equal(min_linear_ball_slab(torch.ones(2, dtype=torch.float64), 0.0, v, 0.5), torch.zeros(2, dtype=torch.float64))


def blobs(n=80, d=4, seed=0, gap=1.5):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 2
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    x[:, 0] += gap * (2 * y - 1)
    return x, y


def test_worst_points_maximise_the_hinge_loss_over_the_feasible_set():
    x, y = blobs()
    fs = feasible_set(x, y, 70)
    g = torch.Generator().manual_seed(1)
    hinge = get_loss("hinge")
    for _ in range(3):
        theta = torch.randn(5, generator=g, dtype=torch.float64)
        worst = fs.worst_points(theta[:-1])
        assert bool(fs.contains(worst, torch.tensor([0, 1])).all())
        for k, sign in ((0, -1.0), (1, 1.0)):
            pts = fs.centroids[k] + sample_ball_slab(float(fs.radii[k]), fs.directions[k], float(fs.slab_radii[k]), 10_000, g)
            brute = float(hinge(sign * (pts @ theta[:-1] + theta[-1])).max())
            exact = float(hinge(sign * (worst[k] @ theta[:-1] + theta[-1])))
            assert exact >= brute - 1e-9 and exact - brute <= 0.05 * (1 + brute)


def test_feasible_set_is_the_sphere_slab_sanitisers():
    x, y = blobs()
    fs = feasible_set(x, y, 70)
    san = SphereSlab(percentile=70).fit(x, y)
    other = FeasibleSet.from_sanitizer(san)
    for a, b in zip((fs.centroids, fs.radii, fs.directions, fs.slab_radii),
                    (other.centroids, other.radii, other.directions, other.slab_radii)):
        assert torch.allclose(a, b)
    assert torch.equal(fs.contains(x, y), san.keep(x, y))


EPSILONS = [0.0, 0.05, 0.1, 0.2, 0.3]


@pytest.fixture(scope="module")
def certificates():
    x, y = blobs()
    fs = feasible_set(x, y, 70)
    return x, y, fs, [certify(x, y, fs, e, rho=1.5, steps=600, retrain_steps=600) for e in EPSILONS]


def test_bound_is_above_the_candidate_attack_and_monotone(certificates):
    x, y, fs, certs = certificates
    for c in certs:
        assert c.upper_bound >= c.lower_bound - 1e-12
        assert len(c.attack_x) == round(c.epsilon * len(x)) and bool(fs.contains(c.attack_x, c.attack_y).all())
        assert float(c.theta.norm()) <= 1.5 + 1e-9 and float(c.attacked_theta.norm()) <= 1.5 + 1e-9
    uppers = [c.upper_bound for c in certs]
    assert all(b >= a - 1e-3 for a, b in zip(uppers, uppers[1:]))  # each run: non-decreasing up to optimisation error
    pooled = bound_curve(certs)
    assert bool((pooled[1:] >= pooled[:-1]).all())  # the pooled bound: non-decreasing exactly
    assert all(float(p) <= u + 1e-12 for p, u in zip(pooled, uppers))
    assert all(float(p) >= c.lower_bound - 1e-9 for p, c in zip(pooled, certs))
    assert uppers[-1] > uppers[0] + 0.02  # the attack does something on this data


def test_bound_holds_for_independent_feasible_attacks(certificates):
    x, y, fs, certs = certificates
    cert = certs[2]  # ε = 0.1
    m = round(cert.epsilon * len(x))
    g = torch.Generator().manual_seed(3)
    clean_theta = train_linear(x, y, 1.5)
    for trial in range(4):
        labels = torch.randint(0, 2, (m,), generator=g)
        if trial == 0:  # the worst points for the clean model, copied
            pts = fs.worst_points(clean_theta[:-1])[labels]
        else:  # random points on the boundary of the feasible set
            pts = torch.stack([fs.centroids[k] + sample_ball_slab(float(fs.radii[k]), fs.directions[k],
                                                                  float(fs.slab_radii[k]), 50, g)[-1] for k in labels])
        assert bool(fs.contains(pts, labels).all())
        xs, ys = torch.cat([x, pts]), torch.cat([y, labels])
        weights = torch.full((len(xs),), 1 / len(x), dtype=torch.float64)
        theta = train_linear(xs, ys, 1.5, weights=weights)
        reached = float((weights * get_loss("hinge")((2 * ys - 1) * (torch.cat([xs, torch.ones(len(xs), 1)], 1) @ theta))).sum())
        assert reached <= cert.upper_bound + 1e-9


def test_epsilon_zero_bound_is_the_clean_optimum(certificates):
    x, y, _, certs = certificates
    clean = evaluate_linear(train_linear(x, y, 1.5, steps=3000), x, y)["loss"]
    assert len(certs[0].attack_x) == 0
    assert certs[0].lower_bound <= clean + 1e-6 and certs[0].upper_bound == pytest.approx(clean, abs=2e-2)


def test_logistic_loss_certificate():
    x, y = blobs(seed=1)
    c = certify(x, y, feasible_set(x, y), 0.1, rho=1.0, loss="logistic", steps=300, retrain_steps=300)
    assert c.loss == "logistic" and c.upper_bound >= c.lower_bound > 0


def test_data_dependent_set_is_estimated_on_the_attacked_data():
    x, y = blobs()
    cert = certify_data_dependent(x, y, 0.2, rho=1.5, rounds=2, steps=300, retrain_steps=300)
    fs = feasible_set(torch.cat([x, cert.attack_x]), torch.cat([y, cert.attack_y]), 70)
    assert torch.allclose(cert.feasible.centroids, fs.centroids) and torch.allclose(cert.feasible.radii, fs.radii)
    oracle = feasible_set(x, y, 70)
    for k in range(2):  # the attack moves each centroid by its share of the class
        mine = cert.attack_y == k
        share = int(mine.sum()) / (int((y == k).sum()) + int(mine.sum()))
        expected = oracle.centroids[k] + share * (cert.attack_x[mine].mean(0) - oracle.centroids[k]) if mine.any() \
            else oracle.centroids[k]
        assert torch.allclose(cert.feasible.centroids[k], expected)
    assert cert.attack_kept == int(fs.contains(cert.attack_x, cert.attack_y).sum())
