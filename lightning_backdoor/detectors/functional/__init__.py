"""Torch-only detector scores (no Lightning imports), one module per method."""

from .ibd_psc import (
    BNLayerCache,
    amplification_runner,
    amplified_forward,
    amplified_layer_counts,
    bn_layers,
    check_k,
    fit_k,
    ibd_psc_score,
    run_amplified,
    select_k,
)
from .scale_up import DEFAULT_SCALES, check_scales, scale_up_class_stats, scale_up_nspc, scale_up_spc
from .shared_prefix import SharedPrefixRunner
from .strip import STRIP_MODES, entropy_over_classes, strip_entropy, strip_overlay_indices, superimpose

__all__ = [
    "BNLayerCache", "DEFAULT_SCALES", "STRIP_MODES", "SharedPrefixRunner", "amplification_runner", "amplified_forward",
    "amplified_layer_counts", "bn_layers", "check_k", "check_scales", "entropy_over_classes", "fit_k", "ibd_psc_score",
    "run_amplified", "scale_up_class_stats", "scale_up_nspc", "scale_up_spc", "select_k", "strip_entropy",
    "strip_overlay_indices", "superimpose",
]
