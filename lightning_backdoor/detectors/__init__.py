"""Input-level backdoor detectors: ``Detector`` interface, registry, and the detectors themselves.

    from lightning_backdoor.detectors import create_detector, list_detectors
    det = create_detector("scale_up", mode="data_limited").fit(model, benign_loader)
"""

from . import functional
from .base import DETECTORS, Detector, collect_benign, create_detector, iter_benign, list_detectors, threshold_at_fpr
from .badexpert import BaDExpert
from .deep_sweep import DeepSweep
from .frequency import Frequency
from .ibd_psc import IBDPSC
from .scale_up import ScaleUp
from .shrink_pad import ShrinkPad
from .strip import Strip
from .teco import TeCo
from .neural_cleanse_filter import NeuralCleanseFilter  # last: it imports lightning_backdoor.defenses

__all__ = [
    "BaDExpert", "DETECTORS", "DeepSweep", "Detector", "Frequency", "IBDPSC", "NeuralCleanseFilter", "ScaleUp", "ShrinkPad", "Strip", "TeCo",
    "collect_benign", "create_detector", "functional", "iter_benign", "list_detectors", "threshold_at_fpr",
]
