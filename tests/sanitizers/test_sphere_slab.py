"""Sphere and slab membership against a direct numpy re-computation; oracle vs data-dependent centroids."""

import numpy as np
import pytest
import torch

from lightning_backdoor.sanitizers import Slab, Sphere, SphereSlab
from lightning_backdoor.sanitizers.functional import removal_metrics


def data(n=90, d=5, k=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, k, (n,), generator=g)
    x = torch.randn(n, d, generator=g, dtype=torch.float64) * (1 + y[:, None]) + 3 * y[:, None]
    return x, y


def np_geometry(x, y, k):
    x, y = x.numpy(), y.numpy()
    mu = np.stack([x[y == c].mean(0) for c in range(k)])
    rest = np.stack([x[y != c].mean(0) for c in range(k)])  # μ_{−y}: every sample of another class
    return mu, mu - rest


def np_sphere(x, y, mu):
    return np.linalg.norm(x.numpy() - mu[y.numpy()], axis=1)


def np_slab(x, y, mu, v):
    return np.abs(((x.numpy() - mu[y.numpy()]) * v[y.numpy()]).sum(1))


def np_radii(dist, y, k, q):
    return np.array([np.percentile(dist[y.numpy() == c], q) for c in range(k)])


@pytest.mark.parametrize("q", [30.0, 70.0, 95.0])
def test_sphere_membership_matches_direct_computation(q):
    fit_x, fit_y = data(seed=0)
    x, y = data(n=200, seed=1)
    mu, _ = np_geometry(fit_x, fit_y, 3)
    r = np_radii(np_sphere(fit_x, fit_y, mu), fit_y, 3, q)
    expected = np_sphere(x, y, mu) <= r[y.numpy()]
    san = Sphere(percentile=q).fit(fit_x, fit_y)
    np.testing.assert_allclose(san.centroids.numpy(), mu, rtol=1e-12)
    np.testing.assert_allclose(san.radii.numpy(), r, rtol=1e-12)
    assert np.array_equal(san.keep(x, y).numpy(), expected)
    np.testing.assert_allclose(san.score(x, y).numpy(), np_sphere(x, y, mu) / r[y.numpy()], rtol=1e-10)


@pytest.mark.parametrize("q", [30.0, 70.0, 95.0])
def test_slab_membership_matches_direct_computation(q):
    fit_x, fit_y = data(seed=0)
    x, y = data(n=200, seed=1)
    mu, v = np_geometry(fit_x, fit_y, 3)
    s = np_radii(np_slab(fit_x, fit_y, mu, v), fit_y, 3, q)
    expected = np_slab(x, y, mu, v) <= s[y.numpy()]
    san = Slab(percentile=q).fit(fit_x, fit_y)
    np.testing.assert_allclose(san.directions.numpy(), v, rtol=1e-10)
    assert np.array_equal(san.keep(x, y).numpy(), expected)
    both = SphereSlab(percentile=q).fit(fit_x, fit_y)
    sphere = Sphere(percentile=q).fit(fit_x, fit_y)
    assert torch.equal(both.keep(x, y), sphere.keep(x, y) & san.keep(x, y))


def test_two_class_slab_uses_the_other_class_centroid():
    x, y = data(k=2)
    san = Slab().fit(x, y)
    assert torch.allclose(san.directions[0], san.centroids[0] - san.centroids[1])
    assert torch.allclose(san.directions[1], -san.directions[0])


def test_given_radii_override_the_percentile():
    x, y = data()
    san = Sphere(radii=[1.0, 2.0, 3.0], percentile=10).fit(x, y)
    assert san.radii.tolist() == [1.0, 2.0, 3.0]
    d = (x - san.centroids[y]).norm(dim=1)
    assert torch.equal(san.keep(x, y), d <= san.radii[y])
    assert Slab(radii=0.5).fit(x, y).radii.tolist() == [0.5, 0.5, 0.5]


def poisoned_set(m=30, seed=0):
    """Clean two-class data plus ``m`` samples far from class 0 but labelled 0 (a dirty-label attack)."""
    clean_x, clean_y = data(n=120, k=2, seed=seed)
    g = torch.Generator().manual_seed(seed + 10)
    poison = torch.randn(m, clean_x.shape[1], generator=g, dtype=torch.float64) * 0.3 + 8.0
    x = torch.cat([clean_x, poison])
    y = torch.cat([clean_y, torch.zeros(m, dtype=torch.long)])
    return x, y, torch.arange(len(x)) >= len(clean_x)


def test_oracle_and_data_dependent_centroids_differ_as_documented():
    x, y, poisoned = poisoned_set()
    trusted_x, trusted_y = data(n=120, k=2, seed=5)
    oracle, dependent = Sphere(mode="oracle"), Sphere(mode="data")
    oracle.sanitize(x, y, clean=(trusted_x, trusted_y))
    dependent.sanitize(x, y)
    # oracle: the trusted set's class means; data-dependent: the means of the training set itself, poison included
    for k in range(2):
        assert torch.allclose(oracle.centroids[k], trusted_x[trusted_y == k].mean(0))
        assert torch.allclose(dependent.centroids[k], x[y == k].mean(0))
    # the poison pulls the data-dependent centroid of its label towards itself by exactly its share of the class
    clean0 = x[(y == 0) & ~poisoned]
    share = poisoned.sum() / (y == 0).sum()
    shift = share * (x[poisoned].mean(0) - clean0.mean(0))
    assert torch.allclose(dependent.centroids[0] - clean0.mean(0), shift)
    # ... which makes the data-dependent defence weaker: it removes fewer of the poisoned samples
    rec_oracle = removal_metrics(~oracle.keep(x, y), oracle.score(x, y), poisoned)["recall"]
    rec_data = removal_metrics(~dependent.keep(x, y), dependent.score(x, y), poisoned)["recall"]
    assert rec_oracle == 1.0 and rec_data < rec_oracle


def test_removal_metrics_match_sklearn():
    from sklearn.metrics import precision_score, recall_score, roc_auc_score

    g = torch.Generator().manual_seed(0)
    poisoned = torch.rand(300, generator=g) < 0.15
    scores = torch.rand(300, generator=g) + 0.8 * poisoned
    removed = scores > 1.0
    m = removal_metrics(removed, scores, poisoned)
    assert m["precision"] == pytest.approx(precision_score(poisoned.numpy(), removed.numpy()))
    assert m["recall"] == pytest.approx(recall_score(poisoned.numpy(), removed.numpy()))
    assert m["auroc"] == pytest.approx(roc_auc_score(poisoned.numpy(), scores.numpy()))
    assert m["removed"] == int(removed.sum()) and m["clean_removed"] == int((removed & ~poisoned).sum())
    assert removal_metrics(removed, scores, None) == {"removed": int(removed.sum()), "clean_removed": int(removed.sum())}
    # nothing removed: precision 0 (sklearn's zero_division default), recall 0
    nothing = removal_metrics(torch.zeros(300, dtype=torch.bool), scores, poisoned)
    assert nothing["precision"] == 0.0 and nothing["recall"] == 0.0
