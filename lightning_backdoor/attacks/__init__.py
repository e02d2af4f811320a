"""Backdoor triggers: ``Attack`` modules mapping clean ``[0, 1]`` images to triggered ones.

    from lightning_backdoor.attacks import create_attack, list_attacks
    attack = create_attack("badnets", patch_size=3, seed=0).build(3, 32, 32)
    x_poisoned = attack(x)              # [N, C, H, W] or [C, H, W], same device/dtype as x

The formulas live in :mod:`lightning_backdoor.attacks.functional` (pure torch).
"""

from . import functional
from .badnets import BadNets
from .base import ATTACKS, Attack, create_attack, list_attacks
from .batch_base import (BATCH_ATTACKS, AttackOptimizer, BatchAttack, PoisonedBatch, create_batch_attack,
                         list_batch_attacks)
from .iad import IAD, IADGenerator
from .model_edit import (MODEL_EDIT_ATTACKS, ModelEditAttack, create_model_edit_attack, evaluate_ba_asr,
                         list_model_edit_attacks)
from .sra import SRA
from .blended import Blended
from .wanet import WaNet

__all__ = [
    "ATTACKS",
    "Attack",
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
    "WaNet",
    "create_attack",
    "functional",
    "list_attacks",
]
