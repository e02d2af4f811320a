"""Torch-only detector scores (no Lightning imports), one module per method."""

from .badexpert import BADEXPERT_RULES, badexpert_score, combine, finetune_copy, wrong_labels
from .consistency import label_change_rate, predicted_labels, variant_labels
from .deep_sweep import DEEP_SWEEP_TRANSFORMS, deep_sweep_score, deep_sweep_variants
from .frequency import dct2, frequency_score, synthetic_triggers, train_frequency_classifier
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
from .shrink_pad import shrink_pad, shrink_pad_score
from .strip import STRIP_MODES, entropy_over_classes, strip_entropy, strip_overlay_indices, superimpose
from .teco import TECO_CORRUPTIONS, TORCH_CORRUPTIONS, first_flip_severity, teco_score

__all__ = [
    "BADEXPERT_RULES", "DEEP_SWEEP_TRANSFORMS", "TECO_CORRUPTIONS", "TORCH_CORRUPTIONS", "badexpert_score", "combine",
    "dct2", "deep_sweep_score", "deep_sweep_variants", "finetune_copy", "first_flip_severity", "frequency_score",
    "label_change_rate", "predicted_labels", "shrink_pad", "shrink_pad_score", "synthetic_triggers", "teco_score",
    "train_frequency_classifier", "variant_labels", "wrong_labels",
    "BNLayerCache", "DEFAULT_SCALES", "STRIP_MODES", "SharedPrefixRunner", "amplification_runner", "amplified_forward",
    "amplified_layer_counts", "bn_layers", "check_k", "check_scales", "entropy_over_classes", "fit_k", "ibd_psc_score",
    "run_amplified", "scale_up_class_stats", "scale_up_nspc", "scale_up_spc", "select_k", "strip_entropy",
    "strip_overlay_indices", "superimpose",
]
