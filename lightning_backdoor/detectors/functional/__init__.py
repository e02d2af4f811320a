"""Torch-only detector scores (no Lightning imports). One explicit import line per module."""

from .scale_up import DEFAULT_SCALES, check_scales, scale_up_class_stats, scale_up_nspc, scale_up_spc
from .strip import STRIP_MODES, entropy_over_classes, strip_entropy, strip_overlay_indices, superimpose
from .ibd_psc import SharedPrefixRunner, amplified_forward, amplified_layer_counts, bn_layers, ibd_psc_score, select_k
