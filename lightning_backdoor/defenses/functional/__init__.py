"""Torch-only model-level defence code (no Lightning imports), one module per method."""

from .neural_cleanse import (
    MAD_CONSTANT,
    NeuronMask,
    ReverseEngineered,
    accuracy,
    anomaly_index,
    default_layer,
    find_layer,
    flagged_labels,
    from_unit,
    layer_activations,
    mask_overlap,
    median,
    rank_neurons,
    reverse_engineer,
    stamp,
    to_unit,
    trigger_asr,
)

__all__ = [
    "MAD_CONSTANT", "NeuronMask", "ReverseEngineered", "accuracy", "anomaly_index", "default_layer", "find_layer",
    "flagged_labels", "from_unit", "layer_activations", "mask_overlap", "median", "rank_neurons", "reverse_engineer",
    "stamp", "to_unit", "trigger_asr",
]
