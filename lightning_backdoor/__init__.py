"""lightning_backdoor: backdoor attacks and input-level backdoor detection for PyTorch Lightning.

    from lightning_backdoor import BackdoorClassifier, BackdoorDataModule
    from lightning_backdoor.attacks import create_attack
    from lightning_backdoor.models import create_model
"""

from .data import BackdoorDataModule
from .modules import BackdoorClassifier

__version__ = "0.1.0"

__all__ = ["BackdoorClassifier", "BackdoorDataModule", "__version__"]
