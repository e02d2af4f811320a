import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_backdoor.detectors.functional import select_k
from lightning_backdoor.losses import IBDPSCAdaptiveLoss


class ResNetish(nn.Module):
    """Stem + one residual block with a projection shortcut (BN registered first, runs last)."""

    ORDER = ["bn0", "bn1", "bn2", "short.1"]

    def __init__(self, num_classes: int = 3) -> None:
        super().__init__()
        self.short = nn.Sequential(nn.Conv2d(4, 6, 1, bias=False), nn.BatchNorm2d(6))
        self.conv0, self.bn0 = nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
        self.conv1, self.bn1 = nn.Conv2d(4, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6)
        self.conv2, self.bn2 = nn.Conv2d(6, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6)
        self.fc = nn.Linear(6, num_classes)

    def forward(self, x):
        h = F.relu(self.bn0(self.conv0(x)))
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(h)))))
        return self.fc(F.adaptive_avg_pool2d(F.relu(out + self.short(h)), 1).flatten(1))


def net_(train: bool = True) -> nn.Module:
    torch.manual_seed(0)
    net = ResNetish().double()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    return net.train(train)


def batch(n: int = 8, seed: int = 1, target: int = 2):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, 6, 6, generator=g, dtype=torch.float64)
    original_y = torch.randint(3, (n,), generator=g)
    poisoned = torch.zeros(n, dtype=torch.bool)
    poisoned[:3] = True
    y = torch.where(poisoned, torch.full_like(original_y, target), original_y)
    return x, y, poisoned, original_y


def amplified_copy(net, k, omega):
    """The function the detector scores: a copy with the last k BNs' gamma/beta times omega, in EVAL mode."""
    ref = copy.deepcopy(net)
    with torch.no_grad():
        for name in ResNetish.ORDER[-k:]:
            ref.get_submodule(name).weight.mul_(omega)
            ref.get_submodule(name).bias.mul_(omega)
    return ref.eval()


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("k", [1, 3])
def test_design1_matches_a_direct_eval_mode_computation(train, k):
    net = net_(train)
    x, y, poisoned, original_y = batch()
    term = IBDPSCAdaptiveLoss(design=1, alpha=0.2, omega=1.7, k=k)
    got = term(net, x, y, poisoned, original_y, 2)
    ref = amplified_copy(net, k, 1.7)
    # (1 - alpha) * (1/N) * sum over the benign samples, N = the whole batch (8), not the 5 benign ones
    expected = 0.8 * F.cross_entropy(ref(x[~poisoned]), y[~poisoned], reduction="sum") / len(x)
    torch.testing.assert_close(got, expected)
    assert term.main_weight == 0.2
    assert all(m.training == train for m in net.modules())  # the caller's mode is restored


def test_design1_differs_between_k_and_k_plus_1_in_train_mode():
    """In train mode every BN re-normalises: amplifying an inner BN would cancel out (bug of issue 8)."""
    net = net_(train=True)
    x, y, poisoned, original_y = batch()
    losses = [float(IBDPSCAdaptiveLoss(design=1, alpha=0.5, omega=1.5, k=k)(net, x, y, poisoned, original_y, 2))
              for k in (1, 2, 3, 4)]
    assert all(abs(a - b) > 1e-5 for a, b in zip(losses, losses[1:])), losses
    # what a train-mode pass would have computed: k=2 (bn2 and the shortcut BN) vs k=3 (+ bn1, which
    # feeds conv2 -> bn2, so a train-mode bn2 normalises its amplification away)
    train_mode = []
    for k in (2, 3):
        ref = amplified_copy(net, k, 1.5).train()
        train_mode.append(float(0.5 * F.cross_entropy(ref(x[~poisoned]), y[~poisoned], reduction="sum") / len(x)))
    assert abs(train_mode[0] - train_mode[1]) < 1e-6 < 1e-5 < abs(losses[1] - losses[2])


@pytest.mark.parametrize("target", [2, torch.tensor(2), None, "per_sample"])
def test_design2_matches_manual(target):
    net = net_()
    x, y, poisoned, original_y = batch()
    if isinstance(target, str):
        target = torch.where(poisoned, torch.full_like(y, 2), torch.zeros_like(y))
    term = IBDPSCAdaptiveLoss(design=2, alpha=0.1, omega=1.5, k=2, zeta=0.3)
    got = term(net, x, y, poisoned, original_y, target)
    ref = amplified_copy(net, 2, 1.5)
    log_p = ref(x[poisoned]).log_softmax(1)
    soft = torch.tensor([0.15, 0.15, 0.7], dtype=torch.float64)  # ζ/(K−1), ζ/(K−1), 1−ζ for t=2
    expected = 0.9 * -(soft * log_p).sum(1).sum() / len(x)  # sum over the 3 poisoned, divided by N = 8
    torch.testing.assert_close(got, expected)
    assert term.main_weight == 0.1


@pytest.mark.parametrize("design", [1, 2])
def test_gradients_reach_original_parameters_and_model_unchanged(design):
    net = net_(train=True)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x, y, poisoned, original_y = batch()
    term = IBDPSCAdaptiveLoss(design=design, k=2)
    term(net, x, y, poisoned, original_y, 2).backward()
    for name in ("bn2", "short.1", "bn0"):
        bn = net.get_submodule(name)
        assert bn.weight.grad.abs().sum() > 0 and bn.bias.grad.abs().sum() > 0
    assert net.conv0.weight.grad.abs().sum() > 0 and net.fc.weight.grad.abs().sum() > 0
    for k, v in net.state_dict().items():  # parameters and BN running stats untouched
        assert torch.equal(v, before[k]), k
    assert all(m.training for m in net.modules())


def test_skips_batches_without_needed_samples():
    net = net_()
    x, y, _, original_y = batch()
    design1, design2 = IBDPSCAdaptiveLoss(design=1, k=1), IBDPSCAdaptiveLoss(design=2, k=1)
    all_poisoned, none_poisoned = torch.ones(8, dtype=torch.bool), torch.zeros(8, dtype=torch.bool)
    assert design1(net, x, y, all_poisoned, original_y, 2) is None
    assert design2(net, x, y, none_poisoned, original_y, 2) is None
    assert design2(net, x, y, none_poisoned, original_y, 2) is None
    assert design1.skipped == 1 and design2.skipped == 2
    assert torch.isfinite(design1(net, x, y, none_poisoned, original_y, 2))


def test_auto_k_fit_and_state():
    net = net_(train=True)
    g = torch.Generator().manual_seed(3)
    bx = torch.rand(20, 3, 6, 6, generator=g, dtype=torch.float64)
    by = torch.randint(3, (20,), generator=g)  # random labels: some error at every k
    term = IBDPSCAdaptiveLoss(design=1, k="auto", omega=3.0, xi=0.0)
    assert term.requires_fit and term.k is None
    x, y, poisoned, original_y = batch()
    with pytest.raises(RuntimeError, match="fit"):
        term(net, x, y, poisoned, original_y, 2)
    term.fit(net, (bx, by))
    k, etas = select_k(net, bx, by, 3.0, 0.0)
    assert term.k == k and term.etas == pytest.approx(etas) and term.fitted
    assert all(m.training for m in net.modules())
    fresh = IBDPSCAdaptiveLoss(design=1, k="auto")
    assert not fresh.fitted
    fresh.load_state_dict(term.state_dict())
    # a restored k stands: a resumed run must not select k again on the partly adapted model
    assert fresh.k == k and fresh.fitted and fresh.etas == pytest.approx(etas)
    assert torch.isfinite(term(net, x, y, poisoned, original_y, 2))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"alpha": 1.5}, "alpha"),
        ({"alpha": -0.1}, "alpha"),
        ({"zeta": 1.0}, "zeta"),
        ({"zeta": -0.1}, "zeta"),
        ({"design": 3}, "design"),
        ({"design": True}, "design"),
        ({"omega": 0}, "omega"),
        ({"k": 0}, "k"),
        ({"k": "all"}, "k"),
        ({"num_classes": 1}, "num_classes"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        IBDPSCAdaptiveLoss(**kwargs)


def test_bad_model_or_k():
    x, y, poisoned, original_y = batch()
    with pytest.raises(ValueError, match="k must be at most"):
        IBDPSCAdaptiveLoss(k=5)(net_(), x, y, poisoned, original_y, 2)
    with pytest.raises(ValueError, match="k must be at most"):
        IBDPSCAdaptiveLoss(k=5).fit(net_(), (x, original_y))
    no_bn = nn.Sequential(nn.Flatten(), nn.Linear(108, 3)).double()
    with pytest.raises(ValueError, match="BatchNorm2d"):
        IBDPSCAdaptiveLoss(k=1)(no_bn, x, y, poisoned, original_y, 2)
    with pytest.raises(ValueError, match="num_classes"):
        IBDPSCAdaptiveLoss(design=2, k=1, num_classes=5)(net_(), x, y, poisoned, original_y, 2)
    with pytest.raises(ValueError, match="target"):
        IBDPSCAdaptiveLoss(design=2, k=1)(net_(), x, y, poisoned, original_y, 7)


def test_resumed_fit_keeps_the_selected_k(tmp_path, monkeypatch):
    """Resuming must not re-run layer selection on the partly adapted model: the checkpoint's k stands."""
    import lightning as L

    from lightning_backdoor import BackdoorClassifier, BackdoorDataModule
    from lightning_backdoor.attacks import BadNets
    from tiny_net import TinyResNet

    def run(max_epochs, ckpt_path=None):
        torch.manual_seed(0)
        term = IBDPSCAdaptiveLoss(design=1, alpha=0.5, k="auto", omega=3.0, xi=0.0)
        module = BackdoorClassifier(TinyResNet(), losses=[term])
        dm = BackdoorDataModule("mnist5k", attack=BadNets(), val_size=0, defense_size=40, batch_size=32)
        trainer = L.Trainer(max_epochs=max_epochs, limit_train_batches=2, logger=False, enable_progress_bar=False,
                            enable_model_summary=False, default_root_dir=tmp_path, num_sanity_val_steps=0,
                            enable_checkpointing=False)
        trainer.fit(module, dm, ckpt_path=ckpt_path)
        return trainer, term

    trainer, term = run(1)
    assert term.fitted and term.k is not None
    trainer.save_checkpoint(tmp_path / "mid.ckpt")
    saved_k = term.k

    calls = []
    original_fit = IBDPSCAdaptiveLoss.fit
    monkeypatch.setattr(IBDPSCAdaptiveLoss, "fit", lambda self, *a: calls.append(1) or original_fit(self, *a))
    _, resumed = run(2, ckpt_path=str(tmp_path / "mid.ckpt"))
    assert calls == [] and resumed.k == saved_k  # restored, not selected again
    _, fresh = run(1)
    assert calls == [1]  # a fresh fit does select
