"""Model-level backdoor defences: ``ModelDefense`` interface, registry, and Neural Cleanse.

    from lightning_backdoor.defenses import NeuralCleanse, create_defense, list_defenses
    nc = create_defense("neural_cleanse", steps=300).fit(model, clean_loader)
    nc.flagged, nc.report()
"""

from . import functional
from .base import DEFENSES, ModelDefense, create_defense, list_defenses
from .neural_cleanse import NeuralCleanse

__all__ = ["DEFENSES", "ModelDefense", "NeuralCleanse", "create_defense", "functional", "list_defenses"]
