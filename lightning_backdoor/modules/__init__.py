"""LightningModules."""

from .classifier import BackdoorClassifier

__all__ = ["BackdoorClassifier"]
