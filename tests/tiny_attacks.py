"""Tiny settings of the fitted attacks (seconds-long ``fit``), shared by the attack, config and bad-input tests.

Importable as ``from tiny_attacks import TINY, fit_tiny``.
"""

import torch
from torch.utils.data import TensorDataset

from lightning_backdoor.attacks import ATTACKS, create_attack

_SURROGATE = dict(surrogate_epochs=1, surrogate_samples=64, surrogate_width=4)
TINY = {
    "label_consistent": dict(steps=2, **_SURROGATE),
    "tuap": dict(epochs=1, samples=32, **_SURROGATE),
    "narcissus": dict(epochs=2, samples=32, **_SURROGATE),
    "issba": dict(code_bits=4, hidden=4, epochs=1, samples=32),
}


def tiny_data(shape=(3, 32, 32), n=24, num_classes=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.rand((n, *shape), generator=g), torch.arange(n) % num_classes)


def needs_fit(name):
    return bool(getattr(ATTACKS.get(name), "requires_fit", False))


def make_tiny(name, **kwargs):
    """A registered attack with tiny fitting costs (for attacks without ``fit``: as ``create_attack``)."""
    return create_attack(name, **{**TINY.get(name, {}), **kwargs})


def fit_tiny(name, shape=(3, 32, 32), target=1, **kwargs):
    """``make_tiny(name)`` fitted on 24 random images of ``shape`` (4 classes), poisoning samples 1 and 5."""
    attack = make_tiny(name, **kwargs)
    if needs_fit(name):
        attack.fit(tiny_data(shape), target, indices=[1, 5])
    return attack
