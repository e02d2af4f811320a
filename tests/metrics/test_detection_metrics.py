import math
import pickle

import numpy as np
import pytest
import torch
from sklearn.metrics import f1_score, roc_auc_score, roc_curve

from lightning_backdoor.metrics.detection import DetectionMetrics, detection_metrics


def sk_reference(scores, target, threshold):
    s, t = np.asarray(scores, dtype=np.float64), np.asarray(target)
    fpr, tpr, _ = roc_curve(t, s)
    return {
        "auroc": roc_auc_score(t, s),
        "f1": f1_score(t, s > threshold, zero_division=0),
        "tpr@fpr1": tpr[fpr <= 0.01].max(),
        "tpr@fpr5": tpr[fpr <= 0.05].max(),
    }


def assert_matches(out, ref):
    assert set(out) == {"auroc", "f1", "tpr@fpr1", "tpr@fpr5"}
    for k, v in ref.items():
        assert float(out[k]) == pytest.approx(v, abs=1e-6), k


def random_case(seed, n=400, scale=1.0, rounding=None):
    g = torch.Generator().manual_seed(seed)
    target = torch.rand(n, generator=g) < 0.3
    scores = torch.randn(n, generator=g) + 1.5 * target.float()
    scores = scores * scale
    if rounding is not None:
        scores = (scores * rounding).round() / rounding  # many ties
    return scores, target


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("scale, rounding", [(1.0, None), (1.0, 2), (50.0, None), (1e-3, None)])
def test_functional_matches_sklearn(seed, scale, rounding):
    scores, target = random_case(seed, scale=scale, rounding=rounding)
    threshold = float(scores.median())
    assert_matches(detection_metrics(scores, target, threshold), sk_reference(scores, target, threshold))


def test_large_scores_are_not_saturated():
    # torchmetrics would apply a sigmoid to these, tying 20, 25, 30 and 40 at 1.0 in float32
    scores, target = torch.tensor([20.0, 30.0, 25.0, 40.0]), torch.tensor([0, 1, 0, 1])
    out = detection_metrics(scores, target, threshold=26.0)
    assert float(out["auroc"]) == 1.0 and float(out["tpr@fpr1"]) == 1.0 and float(out["f1"]) == 1.0


def test_auroc_uses_continuous_scores_not_decisions():
    scores = torch.tensor([0.1, 0.2, 0.3, 0.35, 0.4, 0.45, 0.6, 0.9])
    target = torch.tensor([0, 0, 1, 0, 1, 0, 1, 1])
    threshold = 0.5
    continuous = roc_auc_score(target.numpy(), scores.numpy())
    thresholded = roc_auc_score(target.numpy(), (scores > threshold).numpy())
    assert continuous != pytest.approx(thresholded)
    out = detection_metrics(scores, target, threshold)
    assert float(out["auroc"]) == pytest.approx(continuous)
    assert float(out["f1"]) == pytest.approx(f1_score(target.numpy(), (scores > threshold).numpy()))


def test_threshold_is_strict_and_honoured():
    scores, target = torch.tensor([0.2, 0.5, 0.7]), torch.tensor([0, 1, 1])
    assert float(detection_metrics(scores, target, 0.5)["f1"]) == pytest.approx(2 / 3)  # 0.5 is not > 0.5
    assert float(detection_metrics(scores, target, 0.4)["f1"]) == pytest.approx(1.0)


def test_tpr_at_exact_fpr_boundary():
    # 100 negatives: one negative above all positives gives FPR exactly 1%
    neg = torch.linspace(0, 1, 100)
    neg[-1] = 10.0
    pos = torch.linspace(2, 3, 20)
    scores, target = torch.cat([neg, pos]), torch.cat([torch.zeros(100), torch.ones(20)]).long()
    out = detection_metrics(scores, target, 1.5)
    assert_matches(out, sk_reference(scores, target, 1.5))
    assert float(out["tpr@fpr1"]) == 1.0


def test_one_class_warns_and_returns_nan():
    scores = torch.rand(10)
    for target in (torch.zeros(10, dtype=torch.long), torch.ones(10, dtype=torch.bool)):
        with pytest.warns(UserWarning, match="only one class"):
            out = detection_metrics(scores, target, 0.5)
        assert math.isnan(out["auroc"]) and math.isnan(out["tpr@fpr1"]) and math.isnan(out["tpr@fpr5"])
        assert float(out["f1"]) == pytest.approx(f1_score(target.numpy(), (scores > 0.5).numpy(), zero_division=0))


def test_equal_scores_warn_and_give_half():
    with pytest.warns(UserWarning, match="all scores are equal"):
        out = detection_metrics(torch.full((6,), 3.0), torch.tensor([0, 1, 0, 1, 1, 0]), 0.5)
    assert float(out["auroc"]) == 0.5 and float(out["tpr@fpr5"]) == 0.0


@pytest.mark.parametrize(
    "scores, target, threshold, exc, match",
    [
        (torch.rand(3), torch.tensor([0, 1]), 0.5, ValueError, "same number"),
        (torch.rand(3), torch.tensor([0, 1, 2]), 0.5, ValueError, "0/1"),
        (torch.rand(3), torch.tensor([0.0, 1.0, 1.0]), 0.5, TypeError, "is_poisoned"),
        (torch.tensor([0.1, float("nan"), 0.3]), torch.tensor([0, 1, 1]), 0.5, ValueError, "NaN"),
        (torch.tensor([1, 2, 3]), torch.tensor([0, 1, 1]), 0.5, TypeError, "floating-point"),
        (torch.rand(3), torch.tensor([0, 1, 1]), None, TypeError, "threshold"),
        (torch.zeros(0), torch.zeros(0, dtype=torch.long), 0.5, ValueError, "empty"),
    ],
)
def test_input_errors(scores, target, threshold, exc, match):
    with pytest.raises(exc, match=match):
        detection_metrics(scores, target, threshold)


def test_module_per_batch_and_accumulated():
    metric = DetectionMetrics(threshold=0.3)
    all_s, all_t = [], []
    for seed in range(5):
        scores, target = random_case(seed, n=80, scale=10.0 if seed % 2 else 1.0)
        all_s.append(scores)
        all_t.append(target)
        batch = metric(scores, target)  # forward: value on this batch only
        assert_matches(batch, sk_reference(scores, target, 0.3))
    s, t = torch.cat(all_s), torch.cat(all_t)
    assert_matches(metric.compute(), sk_reference(s, t, 0.3))
    metric.reset()
    metric.update(all_s[0], all_t[0])
    assert_matches(metric.compute(), sk_reference(all_s[0], all_t[0], 0.3))


def test_module_merge_state_like_ddp_and_pickling():
    a, b = DetectionMetrics(0.0), DetectionMetrics(0.0)
    s1, t1 = random_case(1, n=60)
    s2, t2 = random_case(2, n=70)
    a.update(s1, t1)
    b.update(s2, t2)
    assert a._reductions["scores"].__name__ == "dim_zero_cat"
    a.merge_state(b)  # the reduction that sync() applies across ranks
    ref = sk_reference(torch.cat([s1, s2]), torch.cat([t1, t2]), 0.0)
    assert_matches(a.compute(), ref)
    clone = pickle.loads(pickle.dumps(a))
    assert_matches(clone.compute(), ref)
    fresh = pickle.loads(pickle.dumps(DetectionMetrics(0.0)))
    fresh.update(s1, t1)
    assert_matches(fresh.compute(), sk_reference(s1, t1, 0.0))


def test_module_errors():
    with pytest.raises(TypeError, match="threshold"):
        DetectionMetrics(threshold="0.5")
    with pytest.raises(ValueError, match="before any update"), pytest.warns(UserWarning):
        DetectionMetrics(0.5).compute()
