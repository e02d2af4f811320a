"""Frequency (DCT classifier) and BaDExpert (backdoor expert): references, seeding, state, model untouched."""

import copy
import io

import pytest
import scipy.fft
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score
from torch import nn

from lightning_backdoor.attacks import BadNets
from lightning_backdoor.data import load_mnist5k
from lightning_backdoor.detectors import BaDExpert, Frequency, create_detector
from lightning_backdoor.detectors.functional import badexpert as B
from lightning_backdoor.detectors.functional.frequency import dct2, synthetic_triggers


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def digits():
    x, y = load_mnist5k()  # uint8 [5000, 1, 28, 28]
    idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))[:400]
    return x[idx].float() / 255.0, y[idx].long()


def roundtrip(state):
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


# -- Frequency --------------------------------------------------------------------------------------
def test_dct2_matches_scipy():
    x = torch.rand(2, 3, 7, 9, dtype=torch.float64)
    ref = scipy.fft.dctn(x.numpy(), type=2, norm="ortho", axes=(-2, -1))
    torch.testing.assert_close(dct2(x), torch.from_numpy(ref))


def test_synthetic_triggers_change_copies_only():
    x = torch.rand(30, 1, 12, 12)
    x0 = x.clone()
    t = synthetic_triggers(x, torch.Generator().manual_seed(0))
    assert torch.equal(x, x0) and t.shape == x.shape and float(t.min()) >= 0 and float(t.max()) <= 1
    assert bool(((t - x).abs().flatten(1).amax(1) > 0).all())  # every copy carries a trigger


def test_frequency_separates_held_out_synthetic_triggers_and_is_seeded(digits):
    x, y = digits
    net = nn.Sequential(nn.Flatten(), nn.Linear(784, 10))  # the detector never uses the model's outputs
    rng = torch.get_rng_state()
    det = Frequency(seed=3).fit(net, (x[:200], y[:200]))
    assert torch.equal(torch.get_rng_state(), rng)
    clean = det.score(net, x[200:])
    triggered = det.score(net, synthetic_triggers(x[200:], torch.Generator().manual_seed(99)))
    labels = [0] * len(clean) + [1] * len(triggered)
    # it learnt to tell held-out images with fresh synthetic triggers from clean ones (chance: 0.5)
    assert roc_auc_score(labels, torch.cat([clean, triggered]).numpy()) > 0.7
    # a real attack's trigger was never shown to it; it is a finding, not asserted
    again = Frequency(seed=3).fit(net, (x[:200], y[:200]))
    assert torch.equal(again.score(net, x[200:]), clean)
    fresh = Frequency()
    fresh.load_state_dict(roundtrip(det.state_dict()))
    assert torch.equal(fresh.score(net, x[200:]), clean)


def test_frequency_score_equals_direct_recomputation(digits):
    x, y = digits
    net = nn.Identity()
    det = Frequency(epochs=1).fit(net, (x[:40], y[:40]))
    with torch.no_grad():
        logits = det.net((dct2(x[:10]) - det.mean) / det.std)
    torch.testing.assert_close(det.score(net, x[:10]), logits[:, 1] - logits[:, 0])


def test_frequency_refuses_unfitted_and_other_sizes():
    net = nn.Identity()
    with pytest.raises(RuntimeError, match="must be fitted"):
        Frequency().score(net, torch.rand(2, 1, 8, 8))
    det = Frequency(epochs=1).fit(net, (torch.rand(8, 1, 8, 8), torch.zeros(8, dtype=torch.long)))
    with pytest.raises(ValueError, match=r"fitted on images of shape \(1, 8, 8\).*\(1, 10, 10\)"):
        det.score(net, torch.rand(2, 1, 10, 10))


# -- BaDExpert --------------------------------------------------------------------------------------
class TinyCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.drop = nn.Dropout(0.2)
        self.fc = nn.Linear(6 * 7 * 7, 10)

    def forward(self, x):
        h = F.max_pool2d(torch.relu(self.bn(self.conv(x))), 4)
        return self.fc(self.drop(h.flatten(1)))


@pytest.fixture(scope="module")
def backdoored(digits):
    """A small CNN trained for a few steps on BadNets-poisoned digits (target 0)."""
    x, y = digits
    torch.manual_seed(0)
    net = TinyCNN()
    attack = BadNets()
    xp = attack(x[:100])
    xs, ys = torch.cat([x[100:], xp]), torch.cat([y[100:], torch.zeros(100, dtype=torch.long)])
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(60):
        idx = torch.randint(len(xs), (64,), generator=g)
        loss = F.cross_entropy(net(xs[idx]), ys[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net.train(), attack


def test_badexpert_never_modifies_the_model_and_is_seeded(digits, backdoored):
    x, y = digits
    net, _ = backdoored
    state = copy.deepcopy(net.state_dict())
    grads = [None if p.grad is None else p.grad.clone() for p in net.parameters()]
    rng = torch.get_rng_state()
    det = BaDExpert(expert_epochs=2, aux_epochs=2).fit(net, (x[:120], y[:120]))
    assert torch.equal(torch.get_rng_state(), rng)
    assert net.training and all(torch.equal(v, state[k]) for k, v in net.state_dict().items())
    assert all((g is None and p.grad is None) or torch.equal(g, p.grad) for g, p in zip(grads, net.parameters()))
    again = BaDExpert(expert_epochs=2, aux_epochs=2).fit(net, (x[:120], y[:120]))
    assert all(torch.equal(det.expert[k], again.expert[k]) for k in det.expert)
    assert det.threshold == again.threshold
    # the expert learnt the wrong labels: it predicts (y + 1) mod 10 on its fine-tuning samples far more often
    with torch.no_grad():
        net.eval()
        expert_pred = torch.func.functional_call(net, det.expert, (x[:120],)).argmax(1)
        original_pred = net(x[:120]).argmax(1)
        net.train()
    shifted = (y[:120] + 1) % 10
    assert (expert_pred == shifted).float().mean() > (original_pred == shifted).float().mean() + 0.1


def test_badexpert_score_equals_direct_recomputation(digits, backdoored):
    x, y = digits
    net, attack = backdoored
    det = BaDExpert(expert_epochs=1, aux_epochs=1).fit(net, (x[:60], y[:60]))
    test = torch.cat([x[300:310], attack(x[310:320])])
    expert, aux = copy.deepcopy(net).eval(), copy.deepcopy(net).eval()
    expert.load_state_dict(det.expert)
    aux.load_state_dict(det.auxiliary)
    with torch.no_grad():
        pred = copy.deepcopy(net).eval()(test).argmax(1)
        pb = torch.softmax(expert(test).double(), 1).gather(1, pred[:, None]).squeeze(1)
        pa = torch.softmax(aux(test).double(), 1).gather(1, pred[:, None]).squeeze(1)
    torch.testing.assert_close(det.score(net, test), (pb.log() - pa.log()).float())
    for rule, expected in (("expert", pb), ("triangle", -torch.minimum(2 * pa / pb.clamp_min(1e-8),
                                                                        (1 - pb) / (0.5 - pa).clamp_min(1e-8)))):
        other = BaDExpert(rule=rule, threshold=0.0)
        other.load_state_dict({**det.state_dict(), "rule": rule})
        torch.testing.assert_close(other.score(net, test), expected.float())
    fresh = BaDExpert()
    fresh.load_state_dict(roundtrip(det.state_dict()))
    assert torch.equal(fresh.score(net, test), det.score(net, test))
    assert 0 <= det.expert_accuracy <= 1 and 0 <= det.aux_accuracy <= 1


def test_wrong_labels_differ_from_the_true_ones():
    y = torch.arange(40) % 4
    assert torch.equal(B.wrong_labels(y, 4, "shift"), (y + 1) % 4)
    r = B.wrong_labels(y, 4, "random", torch.Generator().manual_seed(0))
    assert bool((r != y).all()) and int(r.max()) < 4 and len(r.unique()) == 4


def test_badexpert_refuses_frozen_models_and_tiny_fit_sets():
    net = TinyCNN()
    data = (torch.rand(30, 1, 28, 28), torch.arange(30) % 10)
    frozen = copy.deepcopy(net).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        BaDExpert().fit(frozen, data)
    with pytest.raises(ValueError, match="at least 10 benign fitting samples.*got 6"):
        BaDExpert().fit(net, (data[0][:6], data[1][:6]))
    with pytest.raises(RuntimeError, match="must be fitted"):
        BaDExpert().score(net, data[0][:2])


def test_registry():
    assert isinstance(create_detector("frequency"), Frequency) and isinstance(create_detector("badexpert"), BaDExpert)
