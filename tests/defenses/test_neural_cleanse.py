"""Neural Cleanse: reverse engineering, the MAD anomaly index, detection of a planted trigger, mitigations."""

import copy
import io
import statistics

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score
from torch import nn

from lightning_backdoor.defenses import NeuralCleanse, create_defense, list_defenses
from lightning_backdoor.defenses.functional import (
    MAD_CONSTANT,
    anomaly_index,
    flagged_labels,
    reverse_engineer,
    stamp,
)
from lightning_backdoor.detectors import NeuralCleanseFilter, create_detector
from lightning_backdoor.losses import NeuralCleanseUnlearning


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class Planted(nn.Module):
    """A hand-made 5-class model on 8x8 images with a planted backdoor.

    Clean task: which of the four 4x4 quadrants is brightest (class 0..3; class 4 = the centre).
    Planted: hidden unit 5 fires when the bottom-right 2x2 corner is bright (mean > 0.85) and feeds
    class 2 -- a trigger of 4 pixels, whereas turning an image into another clean class takes a
    whole quadrant (16 pixels).
    """

    num_classes, in_channels, target = 5, 1, 2

    def __init__(self):
        super().__init__()
        self.hidden = nn.Linear(5, 8)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(8, 5)
        with torch.no_grad():
            self.hidden.weight.zero_()
            self.hidden.bias.zero_()
            self.fc.weight.zero_()
            self.fc.bias.zero_()
            for k in range(5):
                self.hidden.weight[k, k] = 1.0
                self.fc.weight[k, k] = 1.0
            self.fc.weight[2, 5] = 1.0

    def forward(self, x):
        regions = torch.stack([x[:, :, :4, :4].mean((1, 2, 3)), x[:, :, :4, 4:].mean((1, 2, 3)),
                               x[:, :, 4:, :4].mean((1, 2, 3)), x[:, :, 4:, 4:].mean((1, 2, 3)),
                               x[:, :, 2:6, 2:6].mean((1, 2, 3))], 1) * 20
        h = self.hidden(regions)
        trig = 30 * torch.sigmoid((x[:, :, -2:, -2:].mean((1, 2, 3)) - 0.85) * 10)
        h = torch.cat([h[:, :5], trig[:, None], h[:, 6:]], 1)
        return self.fc(self.relu(h))


def planted_data(n=100, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 4
    x = torch.rand(n, 1, 8, 8, generator=g) * 0.3
    for i, k in enumerate(y.tolist()):
        r, c = divmod(k, 2)
        x[i, :, 4 * r:4 * r + 4, 4 * c:4 * c + 4] += 0.3
    return x, y


def true_trigger(x):
    out = x.clone()
    out[:, :, -2:, -2:] = 1.0
    return out


def tiny_cnn(k=4):
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.2),
                         nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                         nn.Linear(16, k))


def test_registry():
    assert list_defenses() == ["neural_cleanse"]
    assert isinstance(create_defense("neural_cleanse", steps=3), NeuralCleanse)
    with pytest.raises(ValueError, match="unknown defense 'nc'.*neural_cleanse"):
        create_defense("nc")


def test_planted_model_is_what_it_says():
    net = Planted()
    x, y = planted_data()
    assert torch.equal(net(x).argmax(1), y)  # the clean task
    xt = true_trigger(x)
    assert bool((net(xt).argmax(1) == 2).all())  # the planted trigger


def test_planted_trigger_is_flagged_on_the_right_label_and_matches_the_patch():
    net, (x, y) = Planted(), planted_data()
    nc = NeuralCleanse(steps=300).fit(net, (x, y))
    assert nc.flagged == [2]
    rows = {r["label"]: r for r in nc.report()}
    assert rows[2]["flagged"] and rows[2]["found"] and rows[2]["asr"] > 0.9
    assert rows[2]["l1"] < 0.6 * min(rows[t]["l1"] for t in (0, 1, 3))
    assert rows[2]["anomaly_index"] > 2 and nc.max_anomaly() == pytest.approx(rows[2]["anomaly_index"])
    region = torch.zeros(8, 8)
    region[-2:, -2:] = 1
    ov = {r["label"]: r for r in nc.overlap(region)}
    assert ov[2]["iou_topk"] == 1.0 and ov[2]["mass_in_trigger"] > 0.9
    assert ov[0]["mass_in_trigger"] < 0.5
    # the report's ASR is an independent re-computation of the stamped trigger on the non-target images
    m, p = nc.trigger(2)
    keep = y != 2
    assert rows[2]["asr"] == pytest.approx(float((net(stamp(x[keep], m, p)).argmax(1) == 2).float().mean()))


def test_masks_and_patterns_stay_in_unit_range_and_norms_are_finite():
    net = tiny_cnn()
    x, y = torch.rand(32, 1, 8, 8), torch.arange(32) % 4
    for lr in (0.1, 50.0):  # a huge step saturates tanh: still in [0, 1], never NaN
        res = reverse_engineer(net, x, y, steps=15, batch_size=8, lr=lr, generator=torch.Generator().manual_seed(0))
        for t in (res.masks, res.patterns):
            assert bool(torch.isfinite(t).all()) and float(t.min()) >= 0.0 and float(t.max()) <= 1.0
        assert bool(torch.isfinite(res.l1).all())
        torch.testing.assert_close(res.l1, res.masks.flatten(1).sum(1))


def test_batched_run_equals_the_per_label_loop():
    net = tiny_cnn()
    x, y = torch.rand(40, 1, 8, 8, generator=torch.Generator().manual_seed(1)), torch.arange(40) % 4
    kw = dict(steps=60, batch_size=8, patience=2, early_stop_patience=4, asr_threshold=0.6)
    a = reverse_engineer(net, x, y, generator=torch.Generator().manual_seed(3), batched=True, **kw)
    b = reverse_engineer(net, x, y, generator=torch.Generator().manual_seed(3), batched=False, **kw)
    assert torch.equal(a.found, b.found) and torch.equal(a.steps, b.steps)
    assert len(set(a.steps.tolist())) > 1 or bool(a.found.any())  # the schedule actually ran (stops differ)
    torch.testing.assert_close(a.masks, b.masks, atol=1e-5, rtol=0)
    torch.testing.assert_close(a.patterns, b.patterns, atol=1e-5, rtol=0)
    torch.testing.assert_close(a.l1, b.l1, atol=1e-4, rtol=0)
    # and the class's batched switch gives the same report
    ra = NeuralCleanse(steps=30, batch_size=8, batched=True).fit(net, (x, y)).report()
    rb = NeuralCleanse(steps=30, batch_size=8, batched=False).fit(net, (x, y)).report()
    for r1, r2 in zip(ra, rb):
        assert r1["label"] == r2["label"] and r1["steps"] == r2["steps"]
        assert r1["l1"] == pytest.approx(r2["l1"], abs=1e-4)


@pytest.mark.parametrize("n", [5, 6, 10])
def test_mad_anomaly_index_matches_a_direct_computation(n):
    g = np.random.default_rng(n)
    norms = g.normal(30, 2, size=n)
    norms[1] = 0.5  # a tiny outlier
    med = statistics.median(norms)
    mad = 1.4826 * statistics.median(abs(v - med) for v in norms)
    expected = [abs(v - med) / mad for v in norms]
    got = anomaly_index(torch.tensor(norms)).tolist()
    assert got == pytest.approx(expected, rel=1e-9)
    assert MAD_CONSTANT == 1.4826
    flagged = flagged_labels(torch.tensor(norms))
    assert flagged == [i for i, v in enumerate(norms) if v < med and expected[i] > 2]
    assert 1 in flagged
    # large norms are outliers too, but never flagged (only the small side means a trigger)
    big = norms.copy()
    big[1] = 500.0
    assert 1 not in flagged_labels(torch.tensor(big))


def test_mad_zero_gives_no_nan():
    idx = anomaly_index(torch.tensor([3.0, 3.0, 3.0, 1.0]))
    assert idx.tolist() == [0.0, 0.0, 0.0, float("inf")]
    assert flagged_labels(torch.tensor([3.0, 3.0, 3.0, 1.0])) == [3]
    with pytest.raises(ValueError, match="finite"):
        anomaly_index(torch.tensor([1.0, float("nan")]))


def _snapshot(net):
    return ({k: v.clone() for k, v in net.state_dict().items()}, [m.training for m in net.modules()],
            [p.grad for p in net.parameters()], [p.requires_grad for p in net.parameters()])


def test_the_model_under_inspection_is_not_modified():
    net = tiny_cnn().train()
    x, y = torch.rand(24, 1, 8, 8), torch.arange(24) % 4
    x0 = x.clone()
    before = _snapshot(net)
    rng = torch.get_rng_state()
    nc = NeuralCleanse(steps=20, batch_size=8).fit(net, (x, y))
    pruned, history = nc.prune(net, (x, y), eval_clean=(x, y))
    pruned_layer, _ = nc.prune(net, (x, y), layer="4", step_fraction=0.25)
    det = NeuralCleanseFilter(NeuralCleanse(steps=10, batch_size=8)).fit(net, (x, y))
    det.score(net, x)
    after = _snapshot(net)
    for k, v in before[0].items():
        assert torch.equal(v, after[0][k]), k
    assert before[1] == after[1] and all(before[1])
    assert all(g is None for g in after[2]) and before[3] == after[3]
    assert torch.equal(x, x0)
    assert torch.equal(torch.get_rng_state(), rng)
    assert pruned is not net and pruned_layer is not net
    assert history[0]["pruned"] == 0.0


def test_pruning_removes_the_planted_trigger_and_keeps_ba():
    net, (x, y) = Planted(), planted_data()
    nc = NeuralCleanse(steps=300).fit(net, (x, y))
    xp = true_trigger(x)
    pruned, history = nc.prune(net, (x, y), eval_clean=(x, y), eval_poisoned=(xp, y), target=2)
    assert history[0]["asr"] == 1.0 and history[0]["reversed_asr"] > 0.9
    last = history[-1]
    assert last["reversed_asr"] < 0.1 and last["asr"] < 0.1 and last["ba"] == 1.0
    # every row's numbers re-computed on the pruned copy (the last row is its final state)
    keep = y != 2
    assert float((pruned(xp[keep]).argmax(1) == 2).float().mean()) == pytest.approx(last["asr"])
    # a named layer's neurons, through a forward hook on the copy
    _, hist2 = nc.prune(net, (x, y), layer="relu", step_fraction=0.125)
    assert hist2[-1]["reversed_asr"] < 0.1 and hist2[-1]["pruned"] >= 1


def test_input_filter_separates_triggered_inputs():
    net, (x, y) = Planted(), planted_data()
    det = NeuralCleanseFilter(NeuralCleanse(steps=300), top_fraction=0.125).fit(net, (x, y))
    assert det.suspects.tolist() == [2]
    xb, _ = planted_data(60, seed=5)
    sb, sp = det.score(net, xb), det.score(net, true_trigger(xb))
    auroc = roc_auc_score([0] * 60 + [1] * 60, torch.cat([sb, sp]).numpy())
    assert auroc > 0.95
    assert float(det.predict(net, true_trigger(xb)).float().mean()) > 0.9
    assert create_detector("neural_cleanse_filter").name == "neural_cleanse_filter"


def test_fitted_state_round_trips_through_weights_only_loading():
    net, (x, y) = Planted(), planted_data()
    nc = NeuralCleanse(steps=100).fit(net, (x, y))
    det = NeuralCleanseFilter(nc, refit=False).fit(net, (x, y))
    assert det.cleanse is nc and nc.steps == 100
    buf = io.BytesIO()
    torch.save({"nc": nc.state_dict(), "det": det.state_dict()}, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    nc2 = NeuralCleanse()
    nc2.load_state_dict(loaded["nc"])
    assert nc2.report() == nc.report()
    assert torch.equal(nc2.masks, nc.masks) and torch.equal(nc2.patterns, nc.patterns)
    det2 = NeuralCleanseFilter()
    det2.load_state_dict(loaded["det"])
    assert det2.threshold == det.threshold and torch.equal(det2.score(net, x), det.score(net, x))
    with pytest.raises(ValueError, match="must contain"):
        NeuralCleanse().load_state_dict({"fitted": True})


def test_unlearning_term_stamps_the_reversed_trigger_with_true_labels():
    net, (x, y) = Planted(), planted_data()
    nc = NeuralCleanse(steps=300).fit(net, (x, y))
    term = NeuralCleanseUnlearning(nc, stamp_rate=0.25, seed=4, refit=False).fit(net, (x, y))
    assert term.main_weight == 0.75 and term.suspects.tolist() == [2]
    xb, yb = x[:8], y[:8]
    got = term(net, xb, yb, torch.zeros(8, dtype=torch.bool), yb)
    g = torch.Generator().manual_seed(4)  # the term's own generator: chosen images, then which trigger
    chosen = torch.randperm(8, generator=g)[:2]
    m, p = nc.trigger(2)
    ref = 0.25 * F.cross_entropy(net(stamp(xb[chosen], m, p)), yb[chosen])
    torch.testing.assert_close(got, ref)
    # extra state round-trips (a resumed fine-tune keeps the triggers and the generator)
    fresh = NeuralCleanseUnlearning(stamp_rate=0.25)
    fresh.load_state_dict(copy.deepcopy(term.state_dict()))
    assert fresh.fitted and torch.equal(fresh.masks, term.masks)
    torch.testing.assert_close(fresh(net, xb, yb, torch.zeros(8, dtype=torch.bool), yb),
                               term(net, xb, yb, torch.zeros(8, dtype=torch.bool), yb))


def test_unlearning_fine_tune_removes_the_backdoor_of_a_trained_model():
    """A tiny CNN trained with a planted 2x2 patch, then unlearned with its reversed trigger."""
    g = torch.Generator().manual_seed(0)
    x, y = planted_data(200, seed=1)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                        nn.Flatten(), nn.Linear(512, 4))
    poison = torch.randperm(200, generator=g)[:40]
    xtr, ytr = x.clone(), y.clone()
    xtr[poison], ytr[poison] = true_trigger(x[poison]), 1
    opt = torch.optim.Adam(net.parameters(), lr=0.01)
    for _ in range(150):
        opt.zero_grad()
        F.cross_entropy(net(xtr), ytr).backward()
        opt.step()
    xt, yt = planted_data(100, seed=2)
    keep = yt != 1

    def asr(model):
        return float((model(true_trigger(xt[keep])).argmax(1) == 1).float().mean())

    assert asr(net) > 0.9
    nc = NeuralCleanse(steps=300).fit(net, (x, y))
    # with 4 classes the MAD test has little to go on; the smallest mask is still the target's
    assert nc.suspect_labels() == [1]
    term = NeuralCleanseUnlearning(nc, stamp_rate=0.2, refit=False).fit(net, (x, y))
    opt = torch.optim.Adam(net.parameters(), lr=0.005)
    for _ in range(30):
        opt.zero_grad()
        loss = term.main_weight * F.cross_entropy(net(x), y) + term(net, x, y, torch.zeros(200, dtype=torch.bool), y)
        loss.backward()
        opt.step()
    assert asr(net) < 0.1
    assert float((net(xt).argmax(1) == yt).float().mean()) > 0.95


def test_defense_finetune_data_module_trains_on_the_clean_share_only():
    from lightning_backdoor import BackdoorDataModule
    from lightning_backdoor.attacks import BadNets
    from lightning_backdoor.data import DefenseFinetuneDataModule

    kw = dict(attack=BadNets(), target=0, rate=0.1, seed=0, val_size=50, defense_size=40, test_size=100)
    dm, ref = DefenseFinetuneDataModule("mnist5k", **kw), BackdoorDataModule("mnist5k", **kw)
    dm.setup()
    ref.setup()
    train = dm.train_dataloader().dataset
    assert len(train) == 40 and torch.equal(train.indices, dm.defense_set.indices)
    items = [train[i] for i in range(len(train))]
    assert not any(s.poisoned for s in items) and all(s.y == s.original_y for s in items)
    assert sorted(set(s.y for s in items)) == list(range(10))  # stratified: every class
    # evaluation is the attack run's: the same poisoned test images
    assert torch.equal(dm.test_poisoned[3].x, ref.test_poisoned[3].x) and len(dm.test_poisoned) == len(ref.test_poisoned)
