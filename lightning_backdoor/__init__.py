"""lightning_backdoor: backdoor attacks and input-level backdoor detection for PyTorch Lightning."""

__version__ = "0.1.0"
