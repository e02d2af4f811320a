"""Input-level backdoor detectors: ``Detector`` interface, registry, and the detectors themselves.

    from lightning_backdoor.detectors import create_detector, list_detectors
    det = create_detector("scale_up", mode="data_limited").fit(model, benign_loader)
"""

from . import functional
from .base import DETECTORS, Detector, collect_benign, create_detector, iter_benign, list_detectors, threshold_at_fpr
from .ibd_psc import IBDPSC
from .scale_up import ScaleUp
from .strip import Strip

__all__ = [
    "DETECTORS", "Detector", "IBDPSC", "ScaleUp", "Strip", "collect_benign", "create_detector", "functional",
    "iter_benign", "list_detectors", "threshold_at_fpr",
]
