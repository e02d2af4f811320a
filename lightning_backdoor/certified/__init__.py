"""Certified bounds on data poisoning against sphere + slab sanitisation (torch only, no Lightning).

Steinhardt, Koh & Liang, "Certified Defenses for Data Poisoning Attacks" (NeurIPS 2017);
docs/certified.md, docs/methods.md §6.

    from lightning_backdoor.certified import certify, feasible_set
    fs = feasible_set(clean_x, clean_y, percentile=70)          # oracle sphere + slab on the clean data
    cert = certify(clean_x, clean_y, fs, epsilon=0.1, rho=2.0)  # linear SVM, ‖θ‖ <= 2
    cert.upper_bound, cert.lower_bound                           # U* and the loss the candidate attack reaches
"""

from .bound import Certificate, bound_curve, certify, certify_data_dependent, evaluate_linear, train_linear
from .feasible import FeasibleSet, feasible_set, min_linear_ball_slab
from .losses import LOSSES, MarginLoss, get_convex_loss, get_loss

__all__ = [
    "Certificate", "FeasibleSet", "LOSSES", "MarginLoss", "bound_curve", "certify", "certify_data_dependent",
    "evaluate_linear", "feasible_set", "get_convex_loss", "get_loss", "min_linear_ball_slab", "train_linear",
]
