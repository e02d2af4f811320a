"""Training-set sanitisers: ``Sanitizer`` interface, registry, feature spaces, and the sphere and slab defences.

    from lightning_backdoor.sanitizers import Sphere, ModelFeatures, create_sanitizer
    san = create_sanitizer("sphere", mode="oracle", percentile=70)
    keep, scores = san.sanitize(train_features, train_labels, clean=(clean_features, clean_labels))

``BackdoorDataModule(..., sanitizer=Sphere())`` applies one before training (docs/sanitizers.md).
"""

from . import functional
from .base import MODES, SANITIZERS, CentroidSanitizer, SanitizeResult, Sanitizer, create_sanitizer, list_sanitizers
from .features import ExtractedFeatures, FeatureExtractor, ModelFeatures, PixelFeatures, extract_features
from .slab import Slab
from .sphere import Sphere
from .sphere_slab import SphereSlab

__all__ = [
    "CentroidSanitizer", "ExtractedFeatures", "FeatureExtractor", "MODES", "ModelFeatures", "PixelFeatures",
    "SANITIZERS", "SanitizeResult", "Sanitizer", "Slab", "Sphere", "SphereSlab", "create_sanitizer",
    "extract_features", "functional", "list_sanitizers",
]
