"""Extra loss terms for adaptive backdoor attacks (the attacker knows the defence), and their registry.

    from lightning_backdoor.losses import create_loss, list_losses
    term = create_loss("scale_up_adaptive", weight=1.0)
"""

from .base import LOSSES, LossTerm, create_loss, list_losses
from .ibd_psc import IBDPSCAdaptiveLoss
from .scale_up import ScaleUpAdaptiveLoss
from .neural_cleanse import NeuralCleanseUnlearning

__all__ = ["LOSSES", "LossTerm", "create_loss", "list_losses", "IBDPSCAdaptiveLoss", "NeuralCleanseUnlearning", "ScaleUpAdaptiveLoss"]
