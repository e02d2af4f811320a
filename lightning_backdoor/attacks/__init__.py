"""Backdoor triggers: ``Attack`` modules mapping clean ``[0, 1]`` images to triggered ones.

    from lightning_backdoor.attacks import create_attack, list_attacks
    attack = create_attack("badnets", patch_size=3, seed=0).build(3, 32, 32)
    x_poisoned = attack(x)              # [N, C, H, W] or [C, H, W], same device/dtype as x

The formulas live in :mod:`lightning_backdoor.attacks.functional` (pure torch).
"""

from . import functional
from .badnets import BadNets
from .base import ATTACKS, Attack, create_attack, list_attacks
from .blended import Blended
from .clean_label import TUAP, LabelConsistent, Narcissus
from .fitted import FittedAttack
from .issba import ISSBA
from .wanet import WaNet

__all__ = [
    "ATTACKS",
    "Attack",
    "BadNets",
    "Blended",
    "FittedAttack",
    "ISSBA",
    "LabelConsistent",
    "Narcissus",
    "TUAP",
    "WaNet",
    "create_attack",
    "functional",
    "list_attacks",
]
