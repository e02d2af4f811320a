"""LightningModules."""

from .classifier import BackdoorClassifier, parse_batch

__all__ = ["BackdoorClassifier", "parse_batch"]
