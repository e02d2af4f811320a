"""Backdoor triggers: ``Attack`` modules mapping clean ``[0, 1]`` images to triggered ones.

    from lightning_backdoor.attacks import create_attack, list_attacks
    attack = create_attack("badnets", patch_size=3, seed=0).build(3, 32, 32)
    x_poisoned = attack(x)              # [N, C, H, W] or [C, H, W], same device/dtype as x

Train-time and test-time triggers may differ: ``attack(x)`` is the test-time trigger,
``attack.train_trigger(x, generator)`` the one poisoned training samples get (see ``base.py``).

The formulas live in :mod:`lightning_backdoor.attacks.functional` (pure torch).
"""

from . import functional
from .adaptive import AdaptiveBlend, AdaptivePatch
from .badnets import BadNets
from .base import ATTACKS, Attack, create_attack, list_attacks
from .batt import BATT
from .batch_base import (BATCH_ATTACKS, AttackOptimizer, BatchAttack, PoisonedBatch, create_batch_attack,
                         list_batch_attacks)
from .iad import IAD, IADGenerator
from .model_edit import (MODEL_EDIT_ATTACKS, ModelEditAttack, create_model_edit_attack, evaluate_ba_asr,
                         list_model_edit_attacks)
from .sra import SRA
from .blended import Blended
from .physical_ba import PhysicalBA
from .clean_label import TUAP, LabelConsistent, Narcissus
from .fitted import FittedAttack
from .issba import ISSBA
from .wanet import WaNet

__all__ = [
    "ATTACKS",
    "AdaptiveBlend",
    "AdaptivePatch",
    "Attack",
    "BATT",
    "AttackOptimizer",
    "BATCH_ATTACKS",
    "BatchAttack",
    "IAD",
    "MODEL_EDIT_ATTACKS",
    "ModelEditAttack",
    "SRA",
    "create_model_edit_attack",
    "evaluate_ba_asr",
    "list_model_edit_attacks",
    "IADGenerator",
    "PoisonedBatch",
    "create_batch_attack",
    "list_batch_attacks",
    "BadNets",
    "Blended",
    "PhysicalBA",
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
