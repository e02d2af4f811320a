"""Metrics: BA/ASR for classifiers and AUROC/F1/TPR@FPR for detectors (torchmetrics, DDP-correct)."""

from .backdoor import AttackSuccessRate, BenignAccuracy, attack_success_rate, benign_accuracy

__all__ = ["AttackSuccessRate", "BenignAccuracy", "attack_success_rate", "benign_accuracy"]
